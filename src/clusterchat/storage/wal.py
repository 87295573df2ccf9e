"""SQLite WAL checkpoints off the writer's path.

SQLite's own auto-checkpoint runs inside the COMMIT that crosses its threshold: the
message writer then copies a whole batch's pages into the database file (and fsyncs it)
before it can reply, which measured as ~60% of COMMIT time and the node's worst latency
spikes. The writer connections therefore run with `wal_autocheckpoint=0`, and
this thread, on a connection of its own, runs PASSIVE checkpoints after commits: they
copy what is in the WAL without blocking the writer or readers (SQLite releases the
GIL while it copies).

A PASSIVE checkpoint alone never lets a busy WAL start over: SQLite rewinds the log only
when a write transaction begins with every frame already copied, and under steady load
a new commit always lands while the checkpoint runs. When the WAL has grown past
`rewind_frames`, `rewind_due` asks the writer to finish the checkpoint itself between two
batches (it then has at most the frames of the last batch or two left to copy), so its
next transaction rewinds the log. `journal_size_limit` then keeps the file's size bounded.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

REWIND_FRAMES = 16384  # pages in the WAL before the writer finishes a checkpoint (64 MiB at 4 KiB)
MIN_INTERVAL = 0.1  # seconds between two checkpoints: a page rewritten by many commits is copied once


class WalCheckpointer:
    """A thread that checkpoints one SQLite database's WAL after commits."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], *, rewind_frames: int = REWIND_FRAMES,
                 min_interval: float = MIN_INTERVAL) -> None:
        self._connect = connect
        self.rewind_frames = rewind_frames
        self._min_interval = min_interval
        self._wake = threading.Event()
        self._stopped = False
        self.rewind_due = False
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called after a commit: there is something to copy."""
        self._wake.set()

    def rewind(self, cursor: Any) -> None:
        """On a writer's connection, outside any transaction: finish the checkpoint so the
        next write transaction starts the WAL over."""
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        busy, frames, copied = cursor.fetchone()
        if not busy and frames == copied:
            self.rewind_due = False

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("the WAL checkpointer could not open the database; SQLite will checkpoint on its own")
            return
        try:
            while True:
                self._wake.wait(timeout=1.0)  # commits not announced (accounts, friends) get copied too
                self._wake.clear()
                if self._stopped:
                    return
                self._checkpoint(conn)
                time.sleep(self._min_interval)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)
            return
        busy, frames, _copied = row
        self.checkpoints += 1
        if not busy:
            self.rewind_due = frames > self.rewind_frames
