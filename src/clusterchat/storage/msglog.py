"""SQLite: a message is made durable in a log file first, and reaches the tables later, in bigger batches.

Writing a batch of messages straight into the tables costs SQLite a whole page in the
WAL (and again in the checkpoint) for every B-tree leaf the batch touches: a message
touches about four (the conversation index, the recipient's inbox, the sender's cmids,
the inbox heads), one leaf per user or pair, so small batches cost ~0.35 ms of CPU per
one- or two-message transaction and that, not the event loop, set the latency at
moderate rates (docs/design.md has the figures, before and after).

So on SQLite the message writer's transaction is one row appended to a log in a second
database file beside the main one (`<database>-msglog`): the batch, encoded as
MessagePack, with every message's id and every delivery's seq already decided. That is
one or two fresh pages whatever the batch, and it commits (fsync of the log's WAL)
before any request of the batch is answered, so "ok" still means durable.

The log's batches are then applied to the tables (messages, inbox, inbox_state,
message_cmids, counters) by the main database's writer thread, many batches in one
transaction: after `APPLY_DELAY` seconds, at once when `APPLY_MAX` messages wait, and at
once when a reader waits. Being another file, the log has its own write lock: applying
never holds up the next append.

An apply on the timer is background work, and it is paced: after each statement (at most
`bulk.SQLITE_MAX_ROWS` rows) it gives the CPU back for as long as that statement took, at
least `PAUSE_MIN`, so it never runs for more than one short statement at a time while the
event loop and the log writer, which replies wait for, want the cores. An apply that
someone waits for (a reader, `APPLY_MAX` messages waiting, the close) is not paced, and a
reader arriving during a paced apply ends its pauses.

What this needs, all in this process (an SQLite database has one node):
- message ids and inbox seqs are handed out from memory (`_next_id`, `_seqs`), loaded
  from the tables on start and for users not in the cache;
- a retried cmid is found among the batches not yet applied (`_pending_cmids`) or in
  the table;
- a read of messages or inboxes first waits until everything logged so far is applied
  (`applied_all`), so reads see exactly what they saw before.

Crash safety: the main database records the last batch it applied (counter
`message_log`) in the same transaction as the batch's rows. On start, `recover` applies
the log's later batches, so a batch is applied exactly once whether the process died
before or after applying it; applied batches are deleted from the log afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import bindparam, func, insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable
from clusterchat.storage.bulk import (
    CMID_BUCKETS,
    LOCK_BUCKETS,
    Bulk,
    MessageStatements,
    buckets,
    compile_cmid_lookup,
    compile_sql,
)
from clusterchat.storage.engine import sqlite_connection
from clusterchat.storage.records import (
    CMID_WINDOW_MS,
    OutgoingMessage,
    StoredMessage,
    deliveries,
    message_row,
    split_retries,
)
from clusterchat.storage.schema import counters, inbox_state, message_cmids
from clusterchat.storage.wal import WalCheckpointer
from clusterchat.storage.write_thread import Transaction, WriteThread

if TYPE_CHECKING:
    from clusterchat.storage.engine import Database

log = logging.getLogger(__name__)

LOG_SUFFIX = "-msglog"
APPLY_DELAY = 0.1  # seconds a logged batch waits for more to be applied with it
APPLY_MAX = 4096  # logged messages that are applied at once, without waiting for APPLY_DELAY
APPLY_RETRY = 1.0  # seconds before an apply that failed is tried again
PAUSE_MIN = 0.0005  # seconds a paced apply pauses at least after each statement
SEQ_CACHE_MAX = 65536  # users whose last seq is kept in memory beyond those with batches to apply
APPLIED_COUNTER = "message_log"
_CREATE_LOG = "CREATE TABLE IF NOT EXISTS log_batches (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"


class LoggedMessage(msgspec.Struct, array_like=True, gc=False):
    id: int
    sender_id: int
    to_user: int | None
    group_id: int | None
    text: str
    ts: int
    cmid: str | None
    deliveries: list[tuple[int, int]]  # (user, seq)


class LogBatch(msgspec.Struct, array_like=True, gc=False):
    id: int
    messages: list[LoggedMessage]
    acks: list[tuple[int, int]]  # (user, acked seq), already clamped to the seqs handed out before


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(LogBatch).decode


def log_path(database: str) -> str:
    return database + LOG_SUFFIX


class MessageLog:
    """The log file, its writer thread, and the applying of its batches to the tables."""

    def __init__(self, db: Database) -> None:
        assert db.write_thread is not None and db.sqlite_file is not None
        self._db = db
        self._applier = db.write_thread
        self._main = db.sqlite_file
        self._path = log_path(db.sqlite_file)
        self._loop = asyncio.get_running_loop()
        self._checkpointer = WalCheckpointer(lambda: sqlite_connection(self._path, writer=False))
        self.thread = WriteThread(lambda: sqlite_connection(self._path, writer=True), self._checkpointer,
                                  name="sqlite-msglog")
        self._reader: sqlite3.Connection | None = None  # the main database, read in `thread`
        self._lock = threading.Lock()
        # Set by `recover`, then owned by `thread` (published under _lock after each commit):
        self._next_id = 0
        self._next_batch = 0
        self._seqs: dict[int, int] = {}  # user -> last seq handed out (every user with batches to apply)
        self._pending_cmids: dict[tuple[int, str], tuple[int, int]] = {}  # (sender, cmid) -> (id, ts), not applied
        self._pending: deque[LogBatch] = deque()  # logged, not yet taken by an apply
        self._pending_messages = 0
        self._apply_queued = False
        self._hurry = False  # someone waits for the apply: no pauses
        self._trim_to = 0  # batches up to this one are applied and may leave the log
        self._trimmed = 0
        self.logged = 0  # the last batch committed to the log
        self.applied = 0  # the last batch committed to the tables
        # On the loop:
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False  # closing: no more timers
        self._stopped = False  # closed: nothing will be applied any more (until the next start)

        dialect = db.writer.dialect
        self._sql = MessageStatements(dialect)
        # A cmid past its window is used again: its row is replaced.
        self._put_cmid = Bulk(
            insert(message_cmids).prefix_with("OR REPLACE").values(
                sender_id=bindparam("u"), cmid=bindparam("c"), message_id=bindparam("m"), ts=bindparam("t")),
            dialect, ("u", "c", "m", "t"))
        # Each user's new last seq and acked seq in one statement (both only grow; a 0 keeps what is there).
        # Every user in the log has its inbox_state row (made at registration; users are never deleted).
        state = sqlite_insert(inbox_state).values(
            user_id=bindparam("u"), last_seq=bindparam("l"), acked_seq=bindparam("a"))
        self._set_state = Bulk(
            state.on_conflict_do_update(index_elements=[inbox_state.c.user_id], set_={
                "last_seq": func.max(inbox_state.c.last_seq, state.excluded.last_seq),
                "acked_seq": func.max(inbox_state.c.acked_seq, state.excluded.acked_seq)}),
            dialect, ("u", "l", "a"))
        upsert = sqlite_insert(counters).values(name=bindparam("n"), value=bindparam("v"))
        self._set_counter = compile_sql(
            upsert.on_conflict_do_update(index_elements=[counters.c.name], set_={"value": upsert.excluded.value},
                                         where=counters.c.value < upsert.excluded.value), dialect, ("n", "v"))
        self._read_counter = compile_sql(
            counters.select().with_only_columns(counters.c.value).where(counters.c.name == bindparam("n")),
            dialect, ("n",))
        self._cmid_lookup = {size: compile_cmid_lookup(size, dialect) for size in CMID_BUCKETS}
        self._read_seqs = {size: _compile_read_seqs(size, dialect) for size in LOCK_BUCKETS}

    # ---- start and stop (on the loop) ----

    async def recover(self) -> None:
        """Apply what the log holds beyond what the tables have (after a crash), then load the counters."""
        applied, recovered, last_id = await self._db.run_write(self._recover)
        if recovered:
            log.info("applied %d logged message batches left by the last run", recovered)
        self._next_batch = applied + 1
        self._next_id = last_id + 1
        self.logged = self.applied = self._trim_to = applied

    def _recover(self, cursor: Any) -> tuple[int, int, int]:
        """In the main writer thread, in its transaction: the log's unapplied batches, applied."""
        applied = self._counter(cursor, APPLIED_COUNTER)
        conn = sqlite_connection(self._path, writer=True)
        try:
            conn.execute(_CREATE_LOG)
            rows = conn.execute("SELECT body FROM log_batches WHERE id > ? ORDER BY id", (applied,)).fetchall()
        finally:
            conn.close()
        batches = [_decode(body) for (body,) in rows]
        if batches:
            self._apply(cursor, batches)
            applied = batches[-1].id
        return applied, len(batches), self._counter(cursor, "message_id")

    def _counter(self, cursor: Any, name: str) -> int:
        row = cursor.execute(self._read_counter, (name,)).fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        """Apply everything logged, empty the log, stop its threads (after the last `write`)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            await asyncio.wait_for(self.applied_all(), 10)
        except Exception as exc:  # kept in the log: the next start applies it
            log.warning("logged messages not applied at shutdown (%s); the next start applies them",
                        type(exc).__name__)
        self._stopped = True
        self.thread.submit(self._finish)
        await asyncio.to_thread(self.thread.close)
        await asyncio.to_thread(self._checkpointer.close)

    def _finish(self, transaction: Transaction) -> None:
        """The log thread's last job: drop applied batches, close the reader."""
        try:
            if self._trim_to > self._trimmed:
                transaction(self._trim)
        except sqlite3.Error as exc:
            log.warning("could not trim the message log: %s", exc)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ---- the hot path (in `thread`) ----

    def write(self, transaction: Transaction, sends: list[OutgoingMessage], acks: dict[int, int]) -> None:
        """Log one batch; on return it is committed and each send's `stored` is set."""
        ts = now_ms()
        for s in sends:
            s.stored = None
        fresh, twins = self._dedupe(sends, ts)
        start = self._last_seqs({r for s in fresh for r in s.recipients} | set(acks))
        seqs = dict(start)
        message_id = self._next_id
        logged: list[LoggedMessage] = []
        for s in fresh:
            delivered = deliveries(s.recipients, seqs)
            s.stored = StoredMessage(message_id, ts, delivered)
            logged.append(LoggedMessage(message_id, s.sender_id, s.to_user, s.group_id, s.text, ts, s.cmid,
                                        delivered))
            message_id += 1
        for twin, original in twins:
            assert original.stored is not None
            twin.stored = StoredMessage(original.stored.id, ts, [], duplicate=True)
        # Never past the last seq handed out before this batch: an ack of the future
        # acknowledges nothing, not even a message of this batch (nobody has seen it yet).
        acked = [(u, min(seq, start[u])) for u, seq in acks.items() if u in start and min(seq, start[u]) > 0]
        if not logged and not acked:
            return
        batch = LogBatch(self._next_batch, logged, acked)
        transaction(self._append, batch.id, _encode(batch))
        with self._lock:
            self._next_batch = batch.id + 1
            self._next_id = message_id
            self._seqs.update(seqs)
            for m in logged:
                if m.cmid is not None:
                    self._pending_cmids[(m.sender_id, m.cmid)] = (m.id, ts)
            first = not self._pending
            self._pending.append(batch)
            self._pending_messages += len(logged)
            self.logged = batch.id
            urgent = self._pending_messages >= APPLY_MAX
        if urgent:
            self._request_apply(hurry=True)
        elif first:
            self._loop.call_soon_threadsafe(self._arm)

    def _append(self, cursor: Any, batch_id: int, body: bytes) -> None:
        if self._trim_to > self._trimmed:
            self._trim(cursor)
        cursor.execute("INSERT INTO log_batches (id, body) VALUES (?, ?)", (batch_id, body))

    def _trim(self, cursor: Any) -> None:
        upto = self._trim_to
        cursor.execute("DELETE FROM log_batches WHERE id <= ?", (upto,))
        self._trimmed = upto  # rolled back with the transaction? then deleted again next time: harmless

    def _main_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = sqlite_connection(self._main, writer=False)
        return self._reader

    def _last_seqs(self, users: set[int]) -> dict[int, int]:
        """user -> last seq handed out, for those of `users` who have an inbox."""
        cache = self._seqs  # an apply may swap in a smaller dict meanwhile; this one stays right
        found = {}
        for user_id in users:
            seq = cache.get(user_id)
            if seq is not None:
                found[user_id] = seq
        missing = sorted(users.difference(found))
        if missing:
            # Not cached: nothing is waiting to be applied for them, so the table is current.
            cursor = self._main_reader().cursor()
            try:
                for size, chunk in buckets(missing, LOCK_BUCKETS):
                    found.update(cursor.execute(self._read_seqs[size], tuple(chunk)).fetchall())
            finally:
                cursor.close()
        return found

    def _dedupe(
        self, sends: list[OutgoingMessage], ts: int
    ) -> tuple[list[OutgoingMessage], list[tuple[OutgoingMessage, OutgoingMessage]]]:
        """Resolve retried `cmid`s to their first message; returns the sends to log, and the
        (twin, original) pairs of one cmid sent twice within this batch."""
        keyed: set[tuple[int, str]] = set()
        for s in sends:
            if s.cmid is not None:
                keyed.add((s.sender_id, s.cmid))
        if not keyed:
            return sends, []
        known: dict[tuple[int, str], tuple[int, int]] = {}
        unknown = []
        for key in keyed:
            pending = self._pending_cmids.get(key)
            if pending is not None:
                known[key] = pending
            else:
                unknown.append(key)
        if unknown:
            # Looked up after the pending ones: an apply commits before it forgets its cmids.
            cursor = self._main_reader().cursor()
            try:
                for size, padded in buckets(sorted(unknown), CMID_BUCKETS):
                    cursor.execute(self._cmid_lookup[size], tuple(v for pair in padded for v in pair))
                    for sender_id, cmid, message_id, row_ts in cursor.fetchall():
                        if row_ts > ts - CMID_WINDOW_MS:
                            known[(sender_id, cmid)] = (message_id, row_ts)
            finally:
                cursor.close()
        return split_retries(sends, known)

    # ---- applying (in the main database's writer thread) ----

    def _request_apply(self, *, hurry: bool) -> None:
        """From any thread: have the main writer apply what is logged (once queued is enough);
        `hurry`: someone waits for it, so no pauses (also in an apply already running)."""
        with self._lock:
            if hurry:
                self._hurry = True
            if self._apply_queued:
                return
            self._apply_queued = True
        try:
            self._applier.submit(self._apply_job)
        except RuntimeError:  # the database is closing
            with self._lock:
                self._apply_queued = False

    def _apply_job(self, transaction: Transaction) -> None:
        with self._lock:
            batches = list(self._pending)
            self._pending.clear()
            self._pending_messages = 0
            self._apply_queued = False
            hurry, self._hurry = self._hurry, False
        if not batches:
            self._loop.call_soon_threadsafe(self._applied_through, self.applied, False)
            return
        try:
            transaction(self._apply, batches, None if hurry else self._pause)
        except Exception as exc:
            with self._lock:
                self._pending.extendleft(reversed(batches))
                self._pending_messages += sum(len(b.messages) for b in batches)
            if isinstance(exc, sqlite3.Error):
                log.warning("applying %d logged message batches failed: %s", len(batches), exc)
            else:
                log.error("applying %d logged message batches failed", len(batches), exc_info=exc)
            self._loop.call_soon_threadsafe(self._apply_failed)
            return
        upto = batches[-1].id
        with self._lock:
            if not self._apply_queued:  # a hurry that came during this apply is over; a queued one keeps it
                self._hurry = False
            self.applied = upto
            self._trim_to = upto
            for b in batches:
                for m in b.messages:
                    if m.cmid is not None and self._pending_cmids.get((m.sender_id, m.cmid), (0,))[0] == m.id:
                        del self._pending_cmids[(m.sender_id, m.cmid)]
            if len(self._seqs) > SEQ_CACHE_MAX:
                # Keep the users with seqs still to apply; the table is current for the others.
                waiting = {u for b in self._pending for m in b.messages for u, _ in m.deliveries}
                self._seqs = {u: seq for u, seq in self._seqs.items() if u in waiting}
            more = bool(self._pending)
        self._loop.call_soon_threadsafe(self._applied_through, upto, more)

    def _pause(self, elapsed: float) -> None:
        """Between two statements of a paced apply: let the threads that replies wait for run."""
        if not self._hurry:
            time.sleep(max(PAUSE_MIN, elapsed))

    def _apply(self, cursor: Any, batches: Sequence[LogBatch], pause: Callable[[float], None] | None = None) -> None:
        message_rows = []
        inbox_rows = []
        cmid_rows = []
        heads: dict[int, int] = {}
        acked: dict[int, int] = {}
        for batch in batches:
            for m in batch.messages:
                message_rows.append(message_row(m.id, m.sender_id, m.to_user, m.group_id, m.text, m.ts))
                for user_id, seq in m.deliveries:
                    inbox_rows.append((user_id, seq, m.id))
                    heads[user_id] = seq
                if m.cmid is not None:
                    cmid_rows.append((m.sender_id, m.cmid, m.id, m.ts))
            for user_id, seq in batch.acks:
                if seq > acked.get(user_id, 0):
                    acked[user_id] = seq
        state_rows = [(u, seq, acked.get(u, 0)) for u, seq in heads.items()]
        state_rows.extend((u, 0, seq) for u, seq in acked.items() if u not in heads)
        self._sql.insert_message.run(cursor, message_rows, pause)
        self._sql.insert_inbox.run(cursor, inbox_rows, pause)
        self._set_state.run(cursor, state_rows, pause)
        self._put_cmid.run(cursor, cmid_rows, pause)
        if message_rows:
            cursor.execute(self._set_counter, ("message_id", message_rows[-1][0]))
        cursor.execute(self._set_counter, (APPLIED_COUNTER, batches[-1].id))

    # ---- on the loop ----

    async def applied_all(self) -> None:
        """Return once every batch logged so far is in the tables (reads call this first)."""
        target = self.logged
        if self.applied >= target:
            return
        if self._stopped:
            raise Unavailable("the node is shutting down")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((target, waiter))
        self._request_apply(hurry=True)
        await waiter

    def _arm(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(APPLY_DELAY, self._due)

    def _due(self) -> None:
        self._timer = None
        self._request_apply(hurry=False)

    def _applied_through(self, upto: int, more: bool) -> None:
        waiting = []
        for target, waiter in self._waiters:
            if target <= upto:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((target, waiter))
        self._waiters = waiting
        if waiting:
            self._request_apply(hurry=True)
        elif more:
            self._arm()

    def _apply_failed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable("messages could not be read"))
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(APPLY_RETRY, self._due)


def _compile_read_seqs(size: int, dialect: Any) -> str:
    names = tuple(f"u{i}" for i in range(size))
    query = inbox_state.select().with_only_columns(inbox_state.c.user_id, inbox_state.c.last_seq).where(
        inbox_state.c.user_id.in_([bindparam(n) for n in names]))
    return compile_sql(query, dialect, names)
