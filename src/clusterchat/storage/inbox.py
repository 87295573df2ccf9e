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
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable, as_chat_error
from clusterchat.storage.engine import Database
from clusterchat.storage.schema import counters, inbox, inbox_state, message_cmids, messages, users

log = logging.getLogger(__name__)

CMID_WINDOW_MS = 24 * 3600 * 1000
_CMID_BUCKETS = (1, 4, 16, 64, 256)
_LOCK_BUCKETS = (1, 4, 16, 64, 256, 1024)
_HEADS_CHUNK = 500
_MESSAGE_COLUMNS = ("id", "sender_id", "to_user_id", "group_id", "peer_lo", "peer_hi", "text", "ts")


@dataclass(slots=True)
class StoredMessage:
    """A committed message: its id and ts, and the (user, seq) of each delivery."""

    id: int
    ts: int
    deliveries: list[tuple[int, int]]
    duplicate: bool = False


@dataclass(slots=True)
class OutgoingMessage:
    sender_id: int
    sender_name: str
    to_user: int | None
    group_id: int | None
    recipients: Sequence[int]
    text: str
    cmid: str | None
    future: asyncio.Future[StoredMessage] = field(repr=False)
    stored: StoredMessage | None = None


@dataclass(slots=True)
class AckRequest:
    user_id: int
    seq: int
    future: asyncio.Future[None] = field(repr=False)


@dataclass(frozen=True, slots=True)
class InboxMessage:
    seq: int
    id: int
    sender_id: int
    sender_name: str
    to_user: int | None
    group_id: int | None
    text: str
    ts: int


CommitListener = Callable[[Sequence[OutgoingMessage]], None]


class _Bulk:
    """A Core statement compiled once for the dialect, executed with plain tuples.

    The batch statements run with hundreds of rows; SQLAlchemy's per-row parameter
    processing costs more than the database does, so the rows go to the driver's
    cursor as tuples in the compiled statement's own parameter order. Still parameterized.
    """

    def __init__(self, statement: Any, dialect: Any, order: tuple[str, ...]) -> None:
        self.sql = _compile(statement, dialect, order)

    def run(self, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            cursor.executemany(self.sql, rows)


def _compile(statement: Any, dialect: Any, order: tuple[str, ...]) -> str:
    """`statement` as the driver's SQL, checked to take its parameters in `order`."""
    compiled = statement.compile(dialect=dialect)
    if tuple(compiled.positiontup or ()) != order:
        raise RuntimeError(f"unexpected parameter order {compiled.positiontup} for {order}")
    return str(compiled)


def _compile_cmid_lookup(size: int, dialect: Any) -> str:
    c = message_cmids.c
    query = select(c.sender_id, c.cmid, c.message_id, c.ts).where(
        or_(*(and_(c.sender_id == bindparam(f"s{i}"), c.cmid == bindparam(f"c{i}")) for i in range(size)))
    )
    return _compile(query, dialect, tuple(name for i in range(size) for name in (f"s{i}", f"c{i}")))


def _compile_lock_states(size: int, dialect: Any) -> str:
    """SELECT … FOR UPDATE of `size` inbox_state rows, in user-id order."""
    names = tuple(f"u{i}" for i in range(size))
    query = (
        select(inbox_state.c.user_id, inbox_state.c.last_seq)
        .where(inbox_state.c.user_id.in_([bindparam(n) for n in names]))
        .order_by(inbox_state.c.user_id)
        .with_for_update()
    )
    return _compile(query, dialect, names)


def _buckets(items: Sequence[Any], buckets: tuple[int, ...]) -> Iterable[tuple[int, list[Any]]]:
    """`items` in chunks of at most the largest bucket, each padded (by repeating its last
    item) to the smallest bucket that holds it: a handful of statement shapes, compiled once."""
    largest = buckets[-1]
    for i in range(0, len(items), largest):
        chunk = list(items[i:i + largest])
        size = next(b for b in buckets if b >= len(chunk))
        yield size, chunk + [chunk[-1]] * (size - len(chunk))


class MessageWriter:
    """The one writer of messages, inboxes and acks on this node (group commit)."""

    def __init__(self, db: Database, *, max_batch: int = 8192) -> None:
        self._db = db
        self._max_batch = max_batch
        self._loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._queue: deque[OutgoingMessage | AckRequest] = deque()
        self._storage_errors: tuple[type[Exception], ...] = (DBAPIError, SQLAlchemyError, OSError, *db.driver_errors)
        self._wakeup = asyncio.Event()
        self._closed = False
        self.listeners: list[CommitListener] = []
        dialect = db.writer.dialect
        self._insert_message = _Bulk(
            insert(messages).values({c: bindparam(c) for c in _MESSAGE_COLUMNS}), dialect, _MESSAGE_COLUMNS)
        self._insert_inbox = _Bulk(
            insert(inbox).values(user_id=bindparam("u"), seq=bindparam("s"), message_id=bindparam("m")),
            dialect, ("u", "s", "m"))
        self._set_last_seq = _Bulk(
            update(inbox_state).where(inbox_state.c.user_id == bindparam("u")).values(last_seq=bindparam("s")),
            dialect, ("s", "u"))
        self._set_acked = _Bulk(
            update(inbox_state).where(inbox_state.c.user_id == bindparam("u"), inbox_state.c.acked_seq < bindparam("a"))
            .values(acked_seq=bindparam("s")), dialect, ("s", "u", "a"))
        self._insert_cmid = _Bulk(
            insert(message_cmids).values(sender_id=bindparam("u"), cmid=bindparam("c"), message_id=bindparam("m"),
                                         ts=bindparam("t")), dialect, ("u", "c", "m", "t"))
        self._delete_cmid = _Bulk(
            delete(message_cmids).where(message_cmids.c.sender_id == bindparam("u"),
                                        message_cmids.c.cmid == bindparam("c")), dialect, ("u", "c"))
        self._cmid_lookup = {size: _compile_cmid_lookup(size, dialect) for size in _CMID_BUCKETS}
        self._lock_states = {size: _compile_lock_states(size, dialect) for size in _LOCK_BUCKETS}
        where = counters.c.name == bindparam("n")
        self._bump_counter = _compile(update(counters).where(where).values(value=counters.c.value + bindparam("k")),
                                      dialect, ("k", "n"))
        self._read_counter = _compile(select(counters.c.value).where(where), dialect, ("n",))

    def send(self, sender_id: int, sender_name: str, *, to_user: int | None, group_id: int | None,
             recipients: Sequence[int], text: str, cmid: str | None) -> asyncio.Future[StoredMessage]:
        future: asyncio.Future[StoredMessage] = self._loop.create_future()
        if self._closed:
            future.set_exception(Unavailable("the node is shutting down"))
            return future
        self._queue.append(OutgoingMessage(sender_id, sender_name, to_user, group_id,
                                           recipients, text, cmid, future))
        self._wakeup.set()
        return future

    def ack(self, user_id: int, seq: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            future.set_exception(Unavailable("the node is shutting down"))
            return future
        self._queue.append(AckRequest(user_id, seq, future))
        self._wakeup.set()
        return future

    async def run(self) -> None:
        """Write batches until closed and drained."""
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            started = time.perf_counter()
            await self._write(batch)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("wrote a batch of %d in %.1f ms", n, (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        """Accept nothing more; `run` returns once what is queued is written."""
        self._closed = True
        self._wakeup.set()

    async def _write(self, batch: list[OutgoingMessage | AckRequest]) -> None:
        sends = [item for item in batch if isinstance(item, OutgoingMessage)]
        acks = [item for item in batch if isinstance(item, AckRequest)]
        try:
            await self._db.run_write(self._transaction, sends, acks)
        except self._storage_errors as exc:
            if as_chat_error(exc) is None and len(batch) > 1:
                # Not an outage but one bad row: write each on its own so only it fails.
                log.warning("message batch of %d failed (%s); retrying one by one", len(batch), type(exc).__name__)
                for item in batch:
                    await self._write([item])
                return
            log.warning("message batch of %d failed: %s", len(batch), type(exc).__name__)
            error = as_chat_error(exc) or Unavailable("the message could not be stored")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        except Exception as exc:
            log.exception("message batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
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
        for a in acks:
            if not a.future.done():
                a.future.set_result(None)

    def _transaction(self, cursor: Any, sends: list[OutgoingMessage], acks: list[AckRequest]) -> None:
        # Every statement here is compiled once (in __init__) and runs on the driver's own
        # cursor: per batch, SQLAlchemy's execution machinery cost more than the database.
        ts = now_ms()
        for s in sends:
            s.stored = None
        fresh, twins = self._dedupe(cursor, sends, ts)

        ack_seq: dict[int, int] = {}
        for a in acks:
            if a.seq > ack_seq.get(a.user_id, -1):
                ack_seq[a.user_id] = a.seq
        lock_ids = sorted({r for s in fresh for r in s.recipients} | set(ack_seq))
        last_seq: dict[int, int] = {}
        for size, chunk in _buckets(lock_ids, _LOCK_BUCKETS):
            cursor.execute(self._lock_states[size], tuple(chunk))
            last_seq.update(cursor.fetchall())
        start = dict(last_seq)

        if fresh:
            ids = self._reserve_ids(cursor, len(fresh))
            message_rows = []
            inbox_rows = []
            for s, message_id in zip(fresh, ids, strict=True):
                lo = hi = None
                if s.to_user is not None:
                    lo, hi = min(s.sender_id, s.to_user), max(s.sender_id, s.to_user)
                message_rows.append((message_id, s.sender_id, s.to_user, s.group_id, lo, hi, s.text, ts))
                deliveries = []
                for user_id in s.recipients:
                    seq = last_seq.get(user_id)
                    if seq is None:
                        continue  # no such user any more: nothing to deliver
                    seq += 1
                    last_seq[user_id] = seq
                    deliveries.append((user_id, seq))
                    inbox_rows.append((user_id, seq, message_id))
                s.stored = StoredMessage(message_id, ts, deliveries)
            self._insert_message.run(cursor, message_rows)
            self._insert_inbox.run(cursor, inbox_rows)
            self._set_last_seq.run(cursor, [(seq, u) for u, seq in last_seq.items() if seq != start[u]])
            self._insert_cmid.run(cursor, [(s.sender_id, s.cmid, s.stored.id, ts) for s in fresh
                                         if s.cmid is not None and s.stored is not None])
            for twin, original in twins:
                assert original.stored is not None
                twin.stored = StoredMessage(original.stored.id, ts, [], duplicate=True)

        if ack_seq:
            # Never past the last seq handed out: an ack of the future acknowledges nothing.
            acked = [(u, min(seq, last_seq.get(u, 0))) for u, seq in ack_seq.items()]
            self._set_acked.run(cursor, [(seq, u, seq) for u, seq in acked])

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
        for size, padded in _buckets(pairs, _CMID_BUCKETS):
            cursor.execute(self._cmid_lookup[size], tuple(v for pair in padded for v in pair))
            found = {tuple(row) for row in cursor.fetchall()}  # padding repeats a pair
            for sender_id, cmid, message_id, row_ts in found:
                if row_ts > ts - CMID_WINDOW_MS:
                    known[(sender_id, cmid)] = (message_id, row_ts)
                else:
                    expired.append((sender_id, cmid))
        if expired:
            self._delete_cmid.run(cursor, expired)
        fresh: list[OutgoingMessage] = []
        twins: list[tuple[OutgoingMessage, OutgoingMessage]] = []
        first_in_batch: dict[tuple[int, str], OutgoingMessage] = {}
        for s in sends:
            if s.cmid is None:
                fresh.append(s)
                continue
            key = (s.sender_id, s.cmid)
            if key in known:
                mid, mts = known[key]
                s.stored = StoredMessage(mid, mts, [], duplicate=True)
            elif key in first_in_batch:
                twins.append((s, first_in_batch[key]))
            else:
                first_in_batch[key] = s
                fresh.append(s)
        return fresh, twins


@dataclass(frozen=True, slots=True)
class InboxPage:
    messages: list[InboxMessage]
    more: bool
    last_seq: int
    acked_seq: int


class MessageStore:
    """Reads of inboxes and conversations."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def unacked(self, user_id: int, limit: int) -> InboxPage:
        """The oldest `limit` messages not yet acknowledged (the `offline` of a login)."""
        return await self.since(user_id, None, limit)

    async def since(self, user_id: int, after: int | None, limit: int) -> InboxPage:
        """The messages with seq > `after` (> the acknowledged seq when None), oldest first."""
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
        async with self._db.reader.connect() as conn:
            rows = list(await conn.execute(query))
        rows.reverse()
        return [InboxMessage(0, *row) for row in rows]

    async def last_seqs(self, user_ids: Sequence[int]) -> dict[int, int]:
        """user -> the last seq handed out in its inbox (users without an inbox are left out):
        what a cluster node reads to catch its sessions up after it could not hear the others."""
        heads: dict[int, int] = {}
        async with self._db.reader.connect() as conn:
            for start in range(0, len(user_ids), _HEADS_CHUNK):
                chunk = list(user_ids[start:start + _HEADS_CHUNK])
                rows = await conn.execute(
                    select(inbox_state.c.user_id, inbox_state.c.last_seq).where(inbox_state.c.user_id.in_(chunk)))
                heads.update((int(row.user_id), int(row.last_seq)) for row in rows)
        return heads
