"""Build the project's virtualenv (``.venv``) once, even when ``make run`` and ``make test`` start
together: the second waits on a lock for the first, then finds the virtualenv up to date.

Two pip runs in one virtualenv at once break it (one upgrades pip while the other imports it:
``No module named 'pip._internal.exceptions'``), so all of the set-up happens under the lock.
Usage: ``python3 scripts/setup_venv.py VENV STAMP INPUT...`` (the Makefile's stamp rule).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import venv
from pathlib import Path


def up_to_date(stamp: Path, inputs: list[Path]) -> bool:
    return stamp.exists() and all(stamp.stat().st_mtime >= i.stat().st_mtime for i in inputs)


def main(argv: list[str]) -> int:
    env_dir, stamp, inputs = Path(argv[0]), Path(argv[1]), [Path(a) for a in argv[2:]]
    lock_path = env_dir.with_name(env_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another set-up of {env_dir} to finish...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if up_to_date(stamp, inputs):
            return 0
        stamp.unlink(missing_ok=True)
        print(f"setting up {env_dir} (a few minutes the first time)...", flush=True)
        # Symlinks, as `python -m venv` makes them on POSIX: copying onto an existing
        # virtualenv's symlinked interpreter fails (SameFileError).
        venv.create(env_dir, with_pip=True, symlinks=os.name != "nt")
        python = str(env_dir / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "-r", "requirements-dev.txt", "-e", "."],
            check=True,
        )
        stamp.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
