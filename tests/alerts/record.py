"""A retraining command for the tests: records what the hook gave it, then exits as told.

``python record.py OUTDIR [EXIT_STATUS [RELEASE_FILE]]``: writes OUTDIR/run-<time>-<pid>.json with the
``INFERMON_ALERT_*`` variables, whether the hook's token reached it, the standard input and its pid;
with RELEASE_FILE, waits (at most 30 s) until that file exists before exiting with EXIT_STATUS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    out = Path(sys.argv[1])
    status = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    release = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    record = {
        "env": {k: v for k, v in os.environ.items() if k.startswith("INFERMON_ALERT_")},
        "token_seen": "INFERMON_RETRAIN_HOOK_TOKEN" in os.environ,
        "stdin": json.loads(sys.stdin.read() or "null"),
        "pid": os.getpid(),
    }
    name = f"run-{time.time_ns()}-{os.getpid()}.json"  # runs at once never share a name; sorted by start
    tmp = out / f".{name}"
    tmp.write_text(json.dumps(record))
    tmp.rename(out / name)
    if release is not None:
        deadline = time.monotonic() + 30
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return status


if __name__ == "__main__":
    sys.exit(main())
