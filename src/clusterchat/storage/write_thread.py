"""The thread that writes messages to SQLite, on a connection of its own.

The message writer's transactions run whole in this thread, on the stdlib driver: through
aiosqlite each of their ~10 statements would wait for a turn of a busy event loop before
the next could start, and on the loop itself every COMMIT would stall all connections.

Jobs run one after another. A job is handed `transaction`, which runs `fn(cursor, *args)`
between BEGIN IMMEDIATE and COMMIT (ROLLBACK when it raises). A job may run several
transactions: the message writer's job keeps taking batches off its queue until the
queue is empty, so the thread never waits for a turn of the event loop between two
batches (measured: handing each batch to an executor and back cost ~14% of the
writer's wall time at 4,000 messages a second, in thread wake-ups and waits for the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from clusterchat.storage.wal import WalCheckpointer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Transaction(Protocol):
    def __call__(self, fn: Callable[..., T], *args: Any) -> T: ...


Job = Callable[[Transaction], None]


class WriteThread:
    """One thread, one write connection, jobs in order."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], checkpointer: WalCheckpointer | None, *,
                 name: str = "sqlite-writer") -> None:
        self._connect = connect
        self._checkpointer = checkpointer
        self._conn: sqlite3.Connection | None = None
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._closing:
                raise RuntimeError("the SQLite writer is closed")
            self._jobs.append(job)
            self._ready.notify()

    def close(self) -> None:
        """Run the jobs already submitted, then stop (blocks until then)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._jobs and not self._closing:
                        self._ready.wait()
                    if not self._jobs:
                        return
                    job = self._jobs.popleft()
                try:
                    job(self.transaction)
                except Exception:  # a job reports its own errors; this is a bug in one
                    log.exception("SQLite write job failed")
        finally:
            if self._conn is not None:
                self._conn.close()

    def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(cursor, *args)` in one write transaction, committed when it returns (in this thread)."""
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        cursor = conn.cursor()
        try:
            if self._checkpointer is not None and self._checkpointer.rewind_due:
                self._checkpointer.rewind(cursor)
            cursor.execute("BEGIN IMMEDIATE")
            result = fn(cursor, *args)
            cursor.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            cursor.close()
            if isinstance(exc, sqlite3.OperationalError):  # maybe the connection itself: a new one next time
                self._conn = None
                conn.close()
            raise
        cursor.close()
        if self._checkpointer is not None:
            self._checkpointer.committed()
        return result
