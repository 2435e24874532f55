"""Longer kill -9 loop for retention: gc (retain + compaction) killed at random moments,
then `cdpctl verify` and every retained point read back over NBD against the model.

    python -m tools.torture.retention [--rounds 50]

Runs tests/integration/test_retention_cdpd.py with CDP_RETENTION_KILL_ROUNDS set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.torture.retention")
    p.add_argument("--rounds", type=int, default=50)
    a = p.parse_args(argv)
    env = dict(os.environ, CDP_RETENTION_KILL_ROUNDS=str(a.rounds))
    return subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-s", "tests/integration/test_retention_cdpd.py"],
        env=env)


if __name__ == "__main__":
    sys.exit(main())
