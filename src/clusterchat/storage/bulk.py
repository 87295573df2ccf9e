"""Precompiled SQL for the message writers: statements compiled once, run on the driver's cursor.

The message batches run hundreds of rows through a handful of statements; SQLAlchemy's
per-execution machinery cost more than the database did, so these are compiled once per
dialect and run on the DBAPI cursor with plain tuples. Still parameterized.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Insert, and_, bindparam, insert, or_, select, update

from clusterchat.storage.schema import inbox, inbox_state, message_cmids, messages

SQLITE_MAX_VARIABLES = 999  # the lowest limit of SQLite builds still about (before 3.32)
SQLITE_MAX_ROWS = 64  # rows of one multi-row INSERT: what a paced apply runs between two pauses (msglog.py)
CMID_BUCKETS = (1, 4, 16, 64, 256)
LOCK_BUCKETS = (1, 4, 16, 64, 256, 1024)
MESSAGE_COLUMNS = ("id", "sender_id", "to_user_id", "group_id", "peer_lo", "peer_hi", "text", "ts")


class Bulk:
    """A Core statement compiled once for the dialect, executed with plain tuples.

    The batch statements run with hundreds of rows; SQLAlchemy's per-row parameter
    processing costs more than the database does, so the rows go to the driver's
    cursor as tuples in the compiled statement's own parameter order. Still parameterized.

    On SQLite an INSERT of many rows runs as a few multi-row INSERTs (chunks of powers of
    two): the driver's `executemany` lets go of the GIL around every row, and in the writer
    thread each row then waited for the event loop to hand it back. At most
    `SQLITE_MAX_ROWS` rows go in one statement, so that `run` can pause between
    statements of a long batch (the SQLite message log's background apply does).
    """

    def __init__(self, statement: Any, dialect: Any, order: tuple[str, ...]) -> None:
        self.sql = compile_sql(statement, dialect, order)
        self._chunks: list[tuple[int, str]] = []  # (rows, SQL), largest first
        if dialect.name == "sqlite" and isinstance(statement, Insert):
            row = "(" + ", ".join("?" * len(order)) + ")"
            head, values, tail = self.sql.partition(" VALUES " + row)
            if not values or "?" in tail:  # an ON CONFLICT clause after the row may follow, without parameters
                raise RuntimeError(f"unexpected INSERT form {self.sql}")
            rows = 1
            while rows * 2 * len(order) <= SQLITE_MAX_VARIABLES and rows * 2 <= SQLITE_MAX_ROWS:
                rows *= 2
            while rows > 1:
                self._chunks.append((rows, head + values + (", " + row) * (rows - 1) + tail))
                rows //= 2

    def run(self, cursor: Any, rows: list[tuple[Any, ...]], pause: Callable[[float], None] | None = None) -> None:
        """Run the statement for every row; with `pause`, call it after each statement with
        the seconds that statement took."""
        for sql, chunk, many in self._statements(rows):
            began = time.perf_counter()
            if many:
                cursor.executemany(sql, chunk)
            else:
                cursor.execute(sql, [value for row in chunk for value in row])
            if pause is not None:
                pause(time.perf_counter() - began)

    def _statements(self, rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[tuple[Any, ...]], bool]]:
        """(SQL, its rows, whether it runs with executemany): the multi-row INSERTs, largest
        first, then what is left (everything, on dialects without them) row by row."""
        start = 0
        for size, sql in self._chunks:
            while len(rows) - start >= size:
                yield sql, rows[start:start + size], False
                start += size
        if start < len(rows):
            yield self.sql, rows[start:], True


def compile_sql(statement: Any, dialect: Any, order: tuple[str, ...]) -> str:
    """`statement` as the driver's SQL, checked to take its parameters in `order`."""
    compiled = statement.compile(dialect=dialect)
    if tuple(compiled.positiontup or ()) != order:
        raise RuntimeError(f"unexpected parameter order {compiled.positiontup} for {order}")
    return str(compiled)


def compile_cmid_lookup(size: int, dialect: Any) -> str:
    c = message_cmids.c
    query = select(c.sender_id, c.cmid, c.message_id, c.ts).where(
        or_(*(and_(c.sender_id == bindparam(f"s{i}"), c.cmid == bindparam(f"c{i}")) for i in range(size)))
    )
    return compile_sql(query, dialect, tuple(name for i in range(size) for name in (f"s{i}", f"c{i}")))


def compile_lock_states(size: int, dialect: Any) -> str:
    """SELECT … FOR UPDATE of `size` inbox_state rows, in user-id order."""
    names = tuple(f"u{i}" for i in range(size))
    query = (
        select(inbox_state.c.user_id, inbox_state.c.last_seq)
        .where(inbox_state.c.user_id.in_([bindparam(n) for n in names]))
        .order_by(inbox_state.c.user_id)
        .with_for_update()
    )
    return compile_sql(query, dialect, names)


def buckets(items: Sequence[Any], buckets: tuple[int, ...]) -> Iterable[tuple[int, list[Any]]]:
    """`items` in chunks of at most the largest bucket, each padded (by repeating its last
    item) to the smallest bucket that holds it: a handful of statement shapes, compiled once."""
    largest = buckets[-1]
    for i in range(0, len(items), largest):
        chunk = list(items[i:i + largest])
        size = next(b for b in buckets if b >= len(chunk))
        yield size, chunk + [chunk[-1]] * (size - len(chunk))


class MessageStatements:
    """The writes of a message batch, compiled for one dialect: rows of messages and
    inbox entries, and each user's new last seq and acked seq (both only ever grow)."""

    def __init__(self, dialect: Any) -> None:
        self.insert_message = Bulk(
            insert(messages).values({c: bindparam(c) for c in MESSAGE_COLUMNS}), dialect, MESSAGE_COLUMNS)
        self.insert_inbox = Bulk(
            insert(inbox).values(user_id=bindparam("u"), seq=bindparam("s"), message_id=bindparam("m")),
            dialect, ("u", "s", "m"))
        state = inbox_state.c
        self.set_last_seq = Bulk(  # rows (seq, user, seq)
            update(inbox_state).where(state.user_id == bindparam("u"), state.last_seq < bindparam("l"))
            .values(last_seq=bindparam("s")), dialect, ("s", "u", "l"))
        self.set_acked = Bulk(  # rows (seq, user, seq)
            update(inbox_state).where(state.user_id == bindparam("u"), state.acked_seq < bindparam("a"))
            .values(acked_seq=bindparam("s")), dialect, ("s", "u", "a"))
