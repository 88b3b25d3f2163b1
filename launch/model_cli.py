"""`align-model import SRC --out DIR`: a model source as a plain Hugging Face folder.

SRC is anything a model key accepts (align.models.sources): a `.gguf` file, a folder with
`--gguf-file NAME`, `builtin:smollm2-135m-instruct`, or a saved model folder. GGUF weights are
dequantised to fp32 and saved as safetensors with the tokenizer, its chat template and the
generation config, and a config without `quantization_config`, so the folder loads with
`AutoModelForCausalLM.from_pretrained(DIR)` and every stage can export models trained from it.
Stages do the same by themselves into a cache keyed by the file's hash; this command picks the
place.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from align.errors import UserError
from align.models import sources
from align.models.tokenizer import load_tokenizer


def import_model(source: str, out: str, gguf_file: Optional[str] = None) -> str:
    if sources.is_gguf_source(source, gguf_file):
        return sources.materialise_gguf(sources.gguf_path(source, gguf_file, key="SRC"), out)
    if not os.path.isdir(source):
        raise UserError(f"SRC: {source} is neither a GGUF file nor a model folder")
    # heavy (transformers, torch): only when a model folder is re-saved
    from transformers import AutoModelForCausalLM

    from align.models.builders import save_pretrained

    model = AutoModelForCausalLM.from_pretrained(source)
    return save_pretrained(model, load_tokenizer(source), out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="align-model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="materialise a model source as a safetensors folder")
    imp.add_argument("source", metavar="SRC")
    imp.add_argument("--out", required=True, metavar="DIR")
    imp.add_argument("--gguf-file", default=None, help="the GGUF file inside SRC when SRC is a folder")
    args = parser.parse_args(argv)
    try:
        out = import_model(args.source, args.out, args.gguf_file)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
