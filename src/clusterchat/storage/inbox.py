"""Messages and inboxes: the group-commit writer, and the reads (sync, offline, history).

Every send and ack goes through one `MessageWriter` per node. It takes whatever has
queued up while the previous transaction ran and writes it all in one transaction,
then resolves each request's future, so a reply still means "committed" while the
database sees one round trip per batch rather than per message.

Inbox seqs are handed out under a row lock on `inbox_state`, taken in user-id order,
before the message rows are inserted: for any one user, commit order is seq order,
and message ids of one conversation grow in the order every member sees.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable, as_chat_error
from clusterchat.storage.bulk import (
    CMID_BUCKETS,
    LOCK_BUCKETS,
    Bulk,
    MessageStatements,
    buckets,
    compile_cmid_lookup,
    compile_lock_states,
    compile_sql,
)
from clusterchat.storage.engine import Database
from clusterchat.storage.msglog import MessageLog
from clusterchat.storage.pg_batch import PgBatch
from clusterchat.storage.records import (
    CMID_WINDOW_MS,
    InboxMessage,
    OutgoingMessage,
    StoredMessage,
    deliveries,
    message_row,
    split_retries,
)
from clusterchat.storage.schema import counters, inbox, inbox_state, message_cmids, messages, users
from clusterchat.storage.write_thread import Transaction

log = logging.getLogger(__name__)

ACK_DELAY = 0.05  # seconds an ack waits for a message batch to carry it before it is stored alone
_HEADS_CHUNK = 500


CommitListener = Callable[[Sequence[OutgoingMessage]], None]


class MessageWriter:
    """The one writer of messages, inboxes and acks on this node (group commit).

    On SQLite the batches are written by the database's writer thread, which takes the
    next batch off the queue as soon as it has committed one; elsewhere by `run` on the
    event loop, through the async driver.

    Acks are answered at once and stored with the next batch (within `ACK_DELAY` when no
    message comes to carry them, at once when the user's session ends). An ack lost in a
    crash only means those messages are delivered again, which section 6 allows (at least
    once; clients drop duplicates by id), while waiting for its own commit made every ack
    cost as much as a message (measured: +30% messages a second without).
    """

    def __init__(self, db: Database, *, max_batch: int = 8192) -> None:
        self._db = db
        self._max_batch = max_batch
        self._loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._queue: deque[OutgoingMessage] = deque()
        self._acks: dict[int, int] = {}  # user -> highest seq acked and not yet taken by a batch (under _lock)
        self._unsaved: dict[int, int] = {}  # user -> highest seq acked and not yet committed (loop only)
        self._ack_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        self._storage_errors: tuple[type[Exception], ...] = (DBAPIError, SQLAlchemyError, OSError, *db.driver_errors)
        self._wakeup = asyncio.Event()
        self._closed = False
        # On an SQLite file the batches go to its message log first (see msglog.py).
        self._log = MessageLog(db) if db.sqlite_file is not None else None
        self._thread = self._log.thread if self._log is not None else db.write_thread
        self._lock = threading.Lock()  # guards _draining against the writer thread
        self._draining = False  # a drain job is queued or running in the writer thread
        self._drained: asyncio.Future[None] = self._loop.create_future()
        self.listeners: list[CommitListener] = []
        dialect = db.writer.dialect
        self._sql = MessageStatements(dialect)
        self._insert_cmid = Bulk(
            insert(message_cmids).values(sender_id=bindparam("u"), cmid=bindparam("c"), message_id=bindparam("m"),
                                         ts=bindparam("t")), dialect, ("u", "c", "m", "t"))
        self._delete_cmid = Bulk(
            delete(message_cmids).where(message_cmids.c.sender_id == bindparam("u"),
                                        message_cmids.c.cmid == bindparam("c")), dialect, ("u", "c"))
        self._cmid_lookup = {size: compile_cmid_lookup(size, dialect) for size in CMID_BUCKETS}
        self._pg = PgBatch(dialect) if dialect.name == "postgresql" else None
        self._lock_states = {size: compile_lock_states(size, dialect) for size in LOCK_BUCKETS}
        where = counters.c.name == bindparam("n")
        self._bump_counter = compile_sql(update(counters).where(where).values(value=counters.c.value + bindparam("k")),
                                      dialect, ("k", "n"))
        self._read_counter = compile_sql(select(counters.c.value).where(where), dialect, ("n",))

    async def open(self) -> None:
        """Before the first send or read: on SQLite, apply what the message log kept from a crash."""
        if self._log is not None:
            await self._log.recover()

    async def applied(self) -> None:
        """Return once every message committed so far can be read from the tables (reads call this)."""
        if self._log is not None:
            await self._log.applied_all()

    def send(self, sender_id: int, sender_name: str, *, to_user: int | None, group_id: int | None,
             recipients: Sequence[int], text: str, cmid: str | None) -> asyncio.Future[StoredMessage]:
        future: asyncio.Future[StoredMessage] = self._loop.create_future()
        if self._closed:
            future.set_exception(Unavailable("the node is shutting down"))
            return future
        self._queue.append(OutgoingMessage(sender_id, sender_name, to_user, group_id,
                                           recipients, text, cmid, future))
        self._wake()
        return future

    def ack(self, user_id: int, seq: int) -> None:
        """Acknowledge `user_id`'s inbox up to `seq`; stored with the next batch."""
        if self._closed:
            raise Unavailable("the node is shutting down")
        if seq <= self._unsaved.get(user_id, 0):
            return
        self._unsaved[user_id] = seq
        self._queue_acks({user_id: seq})

    def _queue_acks(self, acks: dict[int, int]) -> None:
        """Hand acks to the next batch (keeping each user's highest); one is due within ACK_DELAY."""
        with self._lock:
            for user_id, seq in acks.items():
                if seq > self._acks.get(user_id, 0):
                    self._acks[user_id] = seq
        if self._ack_timer is None:
            self._ack_timer = self._loop.call_later(ACK_DELAY, self._acks_due)

    def save_acks(self) -> None:
        """Store the acks waiting now, without waiting for a message to carry them."""
        if self._unsaved and not self._closed:  # close() stores them
            self._wake()

    async def acks_saved(self, user_id: int) -> None:
        """Return once `user_id`'s acks so far are committed (a login reads its inbox after this)."""
        if user_id not in self._unsaved or self._closed:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._ack_waiters.setdefault(user_id, []).append(waiter)
        self._wake()
        await waiter

    def _acks_due(self) -> None:
        self._ack_timer = None
        self._wake()

    def _wake(self) -> None:
        if self._thread is None:
            self._wakeup.set()
            return
        with self._lock:
            if self._draining:
                return  # the writer thread takes it with the next batch
            self._draining = True
        self._thread.submit(self._drain)

    async def run(self) -> None:
        """Write batches until closed and drained."""
        if self._thread is not None:
            await self._drained  # the thread writes; this waits for the end (see close)
            if self._log is not None:
                await self._log.close()
            return
        while True:
            if not self._queue and not self._acks:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._write(*self._take())

    def close(self) -> None:
        """Accept nothing more; `run` returns once what is queued is written."""
        if self._closed:
            return
        self._closed = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._wake()
        if self._thread is not None:
            # Jobs run in order: this one runs after every batch queued before it.
            def drained(_: Transaction) -> None:
                self._loop.call_soon_threadsafe(self._settle_drained)

            self._thread.submit(drained)

    def _settle_drained(self) -> None:
        if not self._drained.done():
            self._drained.set_result(None)

    def _take(self) -> tuple[list[OutgoingMessage], dict[int, int]]:
        """The next batch: queued messages and every ack waiting (in whichever thread writes)."""
        n = min(len(self._queue), self._max_batch)
        sends = [self._queue.popleft() for _ in range(n)]
        with self._lock:
            acks, self._acks = self._acks, {}
        return sends, acks

    # ---- SQLite: in the writer thread ----

    def _drain(self, transaction: Transaction) -> None:
        """Write batches until the queue is empty (a job of the SQLite writer thread)."""
        while True:
            with self._lock:
                if not self._queue and not self._acks:
                    self._draining = False
                    return
            self._store(transaction, *self._take())

    def _store(self, transaction: Transaction, sends: list[OutgoingMessage], acks: dict[int, int]) -> None:
        started = time.perf_counter()
        try:
            if self._log is not None:
                self._log.write(transaction, sends, acks)
            else:
                transaction(self._transaction, sends, acks)
        except Exception as exc:
            if self._retry_singly(exc, sends, acks):
                for s in sends:
                    self._store(transaction, [s], {})
                self._store(transaction, [], acks)
                return
            self._loop.call_soon_threadsafe(self._complete, sends, acks, self._failure(exc, sends))
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("wrote %d messages and %d acks in %.1f ms", len(sends), len(acks),
                      (time.perf_counter() - started) * 1000)
        self._loop.call_soon_threadsafe(self._complete, sends, acks, None)

    # ---- other databases: on the event loop ----

    async def _write(self, sends: list[OutgoingMessage], acks: dict[int, int]) -> None:
        try:
            if self._pg is not None:  # the same transaction in four round trips (pg_batch.py)
                await self._db.run_batch(self._pg.write, sends, acks, now_ms())
            else:
                await self._db.run_write(self._transaction, sends, acks)
        except Exception as exc:
            if self._retry_singly(exc, sends, acks):
                for s in sends:
                    await self._write([s], {})
                await self._write([], acks)
                return
            self._complete(sends, acks, self._failure(exc, sends))
            return
        self._complete(sends, acks, None)

    # ---- both ----

    def _retry_singly(self, exc: Exception, sends: list[OutgoingMessage], acks: dict[int, int]) -> bool:
        """Not an outage but maybe one bad row: write each on its own so only it fails."""
        if isinstance(exc, self._storage_errors) and as_chat_error(exc) is None and len(sends) + bool(acks) > 1:
            log.warning("message batch of %d failed (%s); retrying one by one", len(sends), type(exc).__name__)
            return True
        return False

    def _failure(self, exc: Exception, sends: list[OutgoingMessage]) -> Exception:
        """What the requests of a failed batch get."""
        if isinstance(exc, self._storage_errors):
            log.warning("message batch of %d failed: %s", len(sends), type(exc).__name__)
            return as_chat_error(exc) or Unavailable("the message could not be stored")
        log.error("message batch of %d failed", len(sends), exc_info=exc)
        return exc

    def _complete(self, sends: list[OutgoingMessage], acks: dict[int, int], error: Exception | None) -> None:
        """On the loop: resolve a written (or failed) batch's requests, in commit order."""
        if error is not None:
            for s in sends:
                if not s.future.done():
                    s.future.set_exception(error)
            if acks:
                self._acks_failed(acks, error)
            return
        fresh = [s for s in sends if s.stored is not None and not s.stored.duplicate]
        for listener in self.listeners:
            try:
                listener(fresh)
            except Exception:
                log.exception("commit listener failed")
        for s in sends:
            if not s.future.done():
                s.future.set_result(s.stored)  # type: ignore[arg-type]
        for user_id, seq in acks.items():
            unsaved = self._unsaved.get(user_id)
            if unsaved is not None and unsaved <= seq:
                del self._unsaved[user_id]
                for waiter in self._ack_waiters.pop(user_id, ()):
                    if not waiter.done():
                        waiter.set_result(None)

    def _acks_failed(self, acks: dict[int, int], error: Exception) -> None:
        """Acks that could not be stored wait for the next batch; a login waiting for them fails."""
        if not self._closed:
            self._queue_acks(acks)
        for user_id in acks:
            for waiter in self._ack_waiters.pop(user_id, ()):
                if not waiter.done():
                    waiter.set_exception(error)

    def _transaction(self, cursor: Any, sends: list[OutgoingMessage], ack_seq: dict[int, int]) -> None:
        # Every statement here is compiled once (in __init__) and runs on the driver's own
        # cursor: per batch, SQLAlchemy's execution machinery cost more than the database.
        ts = now_ms()
        for s in sends:
            s.stored = None
        fresh, twins = self._dedupe(cursor, sends, ts)

        lock_ids = sorted({r for s in fresh for r in s.recipients} | set(ack_seq))
        last_seq: dict[int, int] = {}
        for size, chunk in buckets(lock_ids, LOCK_BUCKETS):
            cursor.execute(self._lock_states[size], tuple(chunk))
            last_seq.update(cursor.fetchall())
        start = dict(last_seq)

        if fresh:
            ids = self._reserve_ids(cursor, len(fresh))
            message_rows: list[tuple[Any, ...]] = []
            inbox_rows: list[tuple[int, int, int]] = []
            for s, message_id in zip(fresh, ids, strict=True):
                message_rows.append(message_row(message_id, s.sender_id, s.to_user, s.group_id, s.text, ts))
                delivered = deliveries(s.recipients, last_seq)
                inbox_rows.extend((user_id, seq, message_id) for user_id, seq in delivered)
                s.stored = StoredMessage(message_id, ts, delivered)
            self._sql.insert_message.run(cursor, message_rows)
            self._sql.insert_inbox.run(cursor, inbox_rows)
            self._sql.set_last_seq.run(cursor, [(seq, u, seq) for u, seq in last_seq.items() if seq != start[u]])
            self._insert_cmid.run(cursor, [(s.sender_id, s.cmid, s.stored.id, ts) for s in fresh
                                         if s.cmid is not None and s.stored is not None])
            for twin, original in twins:
                assert original.stored is not None
                twin.stored = StoredMessage(original.stored.id, ts, [], duplicate=True)

        if ack_seq:
            # Never past the last seq handed out before this batch: an ack of the future
            # acknowledges nothing, not even a message of this batch (nobody has seen it yet).
            acked = [(u, min(seq, start.get(u, 0))) for u, seq in ack_seq.items()]
            self._sql.set_acked.run(cursor, [(seq, u, seq) for u, seq in acked])

    def _reserve_ids(self, cursor: Any, n: int) -> list[int]:
        """`n` message ids from the `message_id` counter, whose row stays locked until commit.

        Ids are handed out here rather than by autoincrement because INSERT … RETURNING
        in parameter order runs one statement per row on SQLite.
        """
        cursor.execute(self._bump_counter, (n, "message_id"))
        cursor.execute(self._read_counter, ("message_id",))
        (last,) = cursor.fetchone()
        return list(range(last - n + 1, last + 1))

    def _dedupe(
        self, cursor: Any, sends: list[OutgoingMessage], ts: int
    ) -> tuple[list[OutgoingMessage], list[tuple[OutgoingMessage, OutgoingMessage]]]:
        """Resolve retried `cmid`s to their first message.

        Returns the sends to store, and the (twin, original) pairs of one cmid sent
        twice within this batch.
        """
        keyed = [s for s in sends if s.cmid is not None]
        if not keyed:
            return sends, []
        known: dict[tuple[int, str], tuple[int, int]] = {}
        expired: list[tuple[int, str]] = []
        # One index probe per (sender, cmid) pair: `sender IN … AND cmid IN …` probes
        # every combination, and SQLite answers `(sender, cmid) IN (VALUES …)` by
        # scanning the whole table.
        pairs = sorted({(s.sender_id, s.cmid) for s in keyed if s.cmid is not None})
        for size, padded in buckets(pairs, CMID_BUCKETS):
            cursor.execute(self._cmid_lookup[size], tuple(v for pair in padded for v in pair))
            found = {tuple(row) for row in cursor.fetchall()}  # padding repeats a pair
            for sender_id, cmid, message_id, row_ts in found:
                if row_ts > ts - CMID_WINDOW_MS:
                    known[(sender_id, cmid)] = (message_id, row_ts)
                else:
                    expired.append((sender_id, cmid))
        if expired:
            self._delete_cmid.run(cursor, expired)
        return split_retries(sends, known)


@dataclass(frozen=True, slots=True)
class InboxPage:
    messages: list[InboxMessage]
    more: bool
    last_seq: int
    acked_seq: int


class MessageStore:
    """Reads of inboxes and conversations."""

    def __init__(self, db: Database, writer: MessageWriter | None = None) -> None:
        self._db = db
        self._writer = writer

    async def _settled(self) -> None:
        if self._writer is not None:
            await self._writer.applied()

    async def unacked(self, user_id: int, limit: int) -> InboxPage:
        """The oldest `limit` messages not yet acknowledged (the `offline` of a login)."""
        return await self.since(user_id, None, limit)

    async def since(self, user_id: int, after: int | None, limit: int) -> InboxPage:
        """The messages with seq > `after` (> the acknowledged seq when None), oldest first."""
        await self._settled()
        async with self._db.reader.connect() as conn:
            state = (await conn.execute(
                select(inbox_state.c.last_seq, inbox_state.c.acked_seq).where(inbox_state.c.user_id == user_id)
            )).first()
            acked, last = (state.acked_seq, state.last_seq) if state else (0, 0)
            rows = await self._page(conn, user_id, acked if after is None else after, limit)
        return InboxPage(rows[:limit], len(rows) > limit, last, acked)

    async def _page(self, conn: AsyncConnection, user_id: int, after: int, limit: int) -> list[InboxMessage]:
        query = (
            select(inbox.c.seq, messages.c.id, messages.c.sender_id, users.c.name, messages.c.to_user_id,
                   messages.c.group_id, messages.c.text, messages.c.ts)
            .select_from(inbox.join(messages, messages.c.id == inbox.c.message_id)
                         .join(users, users.c.id == messages.c.sender_id))
            .where(inbox.c.user_id == user_id, inbox.c.seq > after)
            .order_by(inbox.c.seq)
            .limit(limit + 1)
        )
        return [InboxMessage(*row) for row in await conn.execute(query)]

    async def history(self, *, user_id: int | None = None, peer: int | None = None,
                      group_id: int | None = None, before: int | None, limit: int) -> list[InboxMessage]:
        """A conversation's `limit` messages before message `before`, oldest first (seq is 0)."""
        query = (
            select(messages.c.id, messages.c.sender_id, users.c.name, messages.c.to_user_id,
                   messages.c.group_id, messages.c.text, messages.c.ts)
            .select_from(messages.join(users, users.c.id == messages.c.sender_id))
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        if group_id is not None:
            query = query.where(messages.c.group_id == group_id)
        else:
            assert user_id is not None and peer is not None
            query = query.where(messages.c.peer_lo == min(user_id, peer),
                                messages.c.peer_hi == max(user_id, peer))
        if before is not None:
            query = query.where(messages.c.id < before)
        await self._settled()
        async with self._db.reader.connect() as conn:
            rows = list(await conn.execute(query))
        rows.reverse()
        return [InboxMessage(0, *row) for row in rows]

    async def last_seqs(self, user_ids: Sequence[int]) -> dict[int, int]:
        """user -> the last seq handed out in its inbox (users without an inbox are left out):
        what a cluster node reads to catch its sessions up after it could not hear the others."""
        heads: dict[int, int] = {}
        await self._settled()
        async with self._db.reader.connect() as conn:
            for start in range(0, len(user_ids), _HEADS_CHUNK):
                chunk = list(user_ids[start:start + _HEADS_CHUNK])
                rows = await conn.execute(
                    select(inbox_state.c.user_id, inbox_state.c.last_seq).where(inbox_state.c.user_id.in_(chunk)))
                heads.update((int(row.user_id), int(row.last_seq)) for row in rows)
        return heads
