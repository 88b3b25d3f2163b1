"""No silent waits: a long wait says what it waits for; a build lock no build holds is removed."""

import os
import subprocess
import sys
import time

from align.waits import announce_wait, clear_stale_lock, lock_is_stale


def test_announce_only_long_waits(capsys):
    with announce_wait("a quick thing", after=0.5):
        time.sleep(0.05)
    with announce_wait("Ray to place 3 actors", after=0.2):
        time.sleep(0.6)
    err = capsys.readouterr().err
    assert err == "[align] waiting for Ray to place 3 actors (more than 0 s so far)\n"


def _lock(tmp_path, age_s):
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir(exist_ok=True)
    lock = build / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return build, str(lock)


def test_orphan_lock_is_removed_with_a_warning(tmp_path, capsys):
    _, lock = _lock(tmp_path, age_s=60)  # a minute old, no compiler running in its folder
    start = time.monotonic()
    clear_stale_lock(lock)
    assert time.monotonic() - start < 2
    assert not os.path.exists(lock)
    assert capsys.readouterr().err == (f"[align] warning: removed the stale build lock {lock} "
                                       f"(no build runs in {os.path.dirname(lock)}; a build was interrupted)\n")


def test_lock_of_a_live_build_is_waited_for(tmp_path, capsys):
    build, lock = _lock(tmp_path, age_s=60)
    # A "compiler" working in the build folder, as ninja does; it finishes and releases the lock.
    builder = subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(1.5); os.remove('lock')"],
                               cwd=build)
    try:
        time.sleep(0.3)
        assert lock_is_stale(lock) is None
        start = time.monotonic()
        clear_stale_lock(lock, poll_s=0.1)
        assert 0.5 < time.monotonic() - start < 10
    finally:
        builder.wait(timeout=30)
    assert "warning" not in capsys.readouterr().err
    assert lock_is_stale(lock) is None  # gone: nothing to clear


def test_very_old_lock_is_stale_whatever_runs(tmp_path):
    build, lock = _lock(tmp_path, age_s=3600)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"], cwd=build)
    try:
        time.sleep(0.3)
        assert lock_is_stale(lock) == "it is 3600 s old"
    finally:
        builder.kill()
        builder.wait()
