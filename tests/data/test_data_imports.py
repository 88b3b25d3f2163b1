"""Importing the data layer never pulls in DeepSpeed or Ray (stages import it in every actor)."""

import os
import subprocess
import sys


def test_import_align_data_is_light():
    code = (
        "import align.data, align.data.sources, align.data.tokenize, align.data.collate, sys\n"
        "assert 'deepspeed' not in sys.modules and 'ray' not in sys.modules, 'heavy import'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
