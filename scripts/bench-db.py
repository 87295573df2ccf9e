"""Start a throw-away database server for benchmarks and print its URL; Ctrl-C stops it.

    python scripts/bench-db.py postgresql   # durable settings (fsync on)
    python scripts/bench-db.py mariadb

Uses the same code as the test fixtures and `clusterchat cluster` (clusterchat.launcher.backends): a free port, data in
a temporary folder, everything removed on exit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path

from clusterchat.launcher.backends import MariaDbServer, PgServer, start_mariadb, start_postgres


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else "postgresql"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="clusterchat-bench-db-") as base:
        context: contextlib.AbstractContextManager[PgServer | MariaDbServer]
        if kind == "postgresql":
            context = start_postgres(Path(base), durable=True)
        elif kind == "mariadb":
            context = start_mariadb(Path(base))
        else:
            print(f"unknown database {kind!r}: postgresql or mariadb", file=sys.stderr)
            return 2
        with context as server:
            print(server.create_database("bench"), flush=True)
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
