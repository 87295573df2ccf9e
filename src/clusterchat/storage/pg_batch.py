"""PostgreSQL: a message batch in four round trips instead of ten or more.

Through the async driver every statement of the batch transaction is one round trip, and
each round trip waits for a turn of the node's event loop before the next statement can
start; under load a turn takes a millisecond or more, so a batch of ~10 statements
(BEGIN, the cmid lookup, the inbox locks, two for the message-id counter, three INSERTs,
two UPDATEs, COMMIT) set the latency of every message in it (docs/design.md has the
figures). Here the same transaction is:

1. BEGIN;
2. one SELECT that locks the recipients' and ackers' `inbox_state` rows in user-id order
   (the lock order of every writer) and, in the same statement, finds retried cmids;
3. one statement whose data-modifying CTEs take the block of message ids from the
   `counters` row (locked after the inbox rows, as everywhere), insert the messages, the
   inbox rows and the cmids, and move each user's last and acked seq (both only grow);
   rows travel as arrays, one parameter per column (`unnest`), so any batch size is one
   statement of one shape;
4. COMMIT.

The guarantees are those of the generic path (storage/inbox.py), statement for statement.
The SQL is written out here rather than built from Core constructs: data-modifying CTEs
over `unnest` of array parameters are PostgreSQL's own. Every value is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from clusterchat.storage.bulk import compile_sql
from clusterchat.storage.records import (
    CMID_WINDOW_MS,
    OutgoingMessage,
    StoredMessage,
    deliveries,
    message_row,
    split_retries,
)

# The cmids are probed one at a time through the primary key (LATERAL ... LIMIT 1), never
# joined: a generic plan made while message_cmids was small joined it by a full scan, and
# that table grows by every message (docs/design.md has the figures).
_LOCK_AND_FIND = """
WITH locked AS (
    SELECT user_id, last_seq FROM inbox_state
    WHERE user_id = ANY(CAST(:users AS BIGINT[]))
    ORDER BY user_id
    FOR UPDATE
)
SELECT user_id, last_seq, CAST(NULL AS TEXT) AS cmid, CAST(NULL AS BIGINT) AS ts FROM locked
UNION ALL
SELECT k.sender_id, c.message_id, k.cmid, c.ts
FROM unnest(CAST(:senders AS BIGINT[]), CAST(:cmids AS TEXT[])) AS k(sender_id, cmid)
CROSS JOIN LATERAL (
    SELECT message_id, ts FROM message_cmids
    WHERE message_cmids.sender_id = k.sender_id AND message_cmids.cmid = k.cmid
    LIMIT 1
) AS c
"""

# `user_id = ANY(...)` repeats the join's condition so that even a generic plan made while
# inbox_state was small or never analyzed reaches the rows through the primary key
# (without it: a hash join over a full scan of the table, one row per user).
_STATE = """
UPDATE inbox_state
SET last_seq = GREATEST(inbox_state.last_seq, t.l), acked_seq = GREATEST(inbox_state.acked_seq, t.a)
FROM unnest(CAST(:s_user AS BIGINT[]), CAST(:s_last AS BIGINT[]), CAST(:s_acked AS BIGINT[])) AS t(u, l, a)
WHERE inbox_state.user_id = t.u AND inbox_state.user_id = ANY(CAST(:s_user AS BIGINT[]))
"""

# Message k of the batch (1-based) gets id base + k, base being the counter before the batch.
_WRITE = f"""
WITH c AS (
    UPDATE counters SET value = value + CAST(:n AS BIGINT) WHERE name = 'message_id'
    RETURNING value - CAST(:n AS BIGINT) AS base
), m AS (
    INSERT INTO messages (id, sender_id, to_user_id, group_id, peer_lo, peer_hi, text, ts)
    SELECT c.base + t.k, t.sender_id, t.to_user_id, t.group_id, t.peer_lo, t.peer_hi, t.body, CAST(:ts AS BIGINT)
    FROM c, unnest(CAST(:m_k AS BIGINT[]), CAST(:m_sender AS BIGINT[]), CAST(:m_to AS BIGINT[]),
                   CAST(:m_group AS BIGINT[]), CAST(:m_lo AS BIGINT[]), CAST(:m_hi AS BIGINT[]),
                   CAST(:m_text AS TEXT[])) AS t(k, sender_id, to_user_id, group_id, peer_lo, peer_hi, body)
), i AS (
    INSERT INTO inbox (user_id, seq, message_id)
    SELECT t.u, t.s, c.base + t.k
    FROM c, unnest(CAST(:i_user AS BIGINT[]), CAST(:i_seq AS BIGINT[]), CAST(:i_k AS BIGINT[])) AS t(u, s, k)
), x AS (
    INSERT INTO message_cmids (sender_id, cmid, message_id, ts)
    SELECT t.u, t.cmid, c.base + t.k, CAST(:ts AS BIGINT)
    FROM c, unnest(CAST(:x_sender AS BIGINT[]), CAST(:x_cmid AS TEXT[]), CAST(:x_k AS BIGINT[])) AS t(u, cmid, k)
), s AS ({_STATE})
SELECT base FROM c
"""

_DELETE_CMID = "DELETE FROM message_cmids WHERE sender_id = :sender AND cmid = :cmid"

_WRITE_ORDER = ("n", "ts", "m_k", "m_sender", "m_to", "m_group", "m_lo", "m_hi", "m_text",
                "i_user", "i_seq", "i_k", "x_sender", "x_cmid", "x_k", "s_user", "s_last", "s_acked")


class PgBatch:
    """The statements of a message batch, compiled once for the PostgreSQL dialect."""

    def __init__(self, dialect: Any) -> None:
        self.lock_and_find = _compile(_LOCK_AND_FIND, dialect, ("users", "senders", "cmids"))
        self._state = _compile(_STATE, dialect, ("s_user", "s_last", "s_acked"))
        self.store = _compile(_WRITE, dialect, _WRITE_ORDER)
        self._delete_cmid = _compile(_DELETE_CMID, dialect, ("sender", "cmid"))

    async def write(self, conn: Any, sends: list[OutgoingMessage], ack_seq: dict[int, int], ts: int) -> None:
        """In the caller's transaction on asyncpg's connection `conn` (`Database.run_batch`):
        store `sends` and `ack_seq`, setting each send's `stored`."""
        for s in sends:
            s.stored = None
        keyed = sorted({(s.sender_id, s.cmid) for s in sends if s.cmid is not None})
        # Every recipient of the batch is locked, retries included (a superset: harmless).
        users = sorted({r for s in sends for r in s.recipients} | set(ack_seq))
        rows = await conn.fetch(self.lock_and_find, users, [k[0] for k in keyed], [k[1] for k in keyed])
        last_seq: dict[int, int] = {}
        known: dict[tuple[int, str], tuple[int, int]] = {}
        expired: list[tuple[int, str]] = []
        for user_or_sender, seq_or_id, cmid, row_ts in rows:
            if cmid is None:
                last_seq[user_or_sender] = seq_or_id
            elif row_ts > ts - CMID_WINDOW_MS:
                known[(user_or_sender, cmid)] = (seq_or_id, row_ts)
            else:
                expired.append((user_or_sender, cmid))
        if expired:  # a cmid past its window is used again (rare: one more round trip, pipelined)
            await conn.executemany(self._delete_cmid, expired)
        fresh, twins = split_retries(sends, known)
        start = dict(last_seq)

        # Never past the last seq handed out before this batch: an ack of the future
        # acknowledges nothing, not even a message of this batch (nobody has seen it yet).
        acked = {u: min(seq, start.get(u, 0)) for u, seq in ack_seq.items()}
        if not fresh:
            if acked:
                users_acked = sorted(acked)
                await conn.execute(self._state, users_acked, [0] * len(users_acked), [acked[u] for u in users_acked])
            return

        columns: tuple[list[Any], ...] = tuple([] for _ in range(7))
        inbox_rows: tuple[list[int], list[int], list[int]] = ([], [], [])
        cmid_rows: tuple[list[int], list[str], list[int]] = ([], [], [])
        delivered_by_send: list[list[tuple[int, int]]] = []
        for k, s in enumerate(fresh, 1):
            # The row as every path builds it (the pair for history), k in place of the id, ts apart.
            values = message_row(k, s.sender_id, s.to_user, s.group_id, s.text, ts)[:7]
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            delivered = deliveries(s.recipients, last_seq)
            delivered_by_send.append(delivered)
            for user_id, seq in delivered:
                inbox_rows[0].append(user_id)
                inbox_rows[1].append(seq)
                inbox_rows[2].append(k)
            if s.cmid is not None:
                cmid_rows[0].append(s.sender_id)
                cmid_rows[1].append(s.cmid)
                cmid_rows[2].append(k)
        state_users = sorted({u for u, seq in last_seq.items() if seq != start[u]} | set(acked))
        row = await conn.fetchrow(
            self.store, len(fresh), ts, *columns, *inbox_rows, *cmid_rows,
            state_users, [last_seq.get(u, 0) for u in state_users], [acked.get(u, 0) for u in state_users])
        if row is None or row[0] is None:
            raise RuntimeError("the message_id counter is missing")
        base = int(row[0])
        for k, (s, delivered) in enumerate(zip(fresh, delivered_by_send, strict=True), 1):
            s.stored = StoredMessage(base + k, ts, delivered)
        for twin, original in twins:
            assert original.stored is not None
            twin.stored = StoredMessage(original.stored.id, ts, [], duplicate=True)


def _compile(sql: str, dialect: Any, order: Sequence[str]) -> str:
    return compile_sql(text(sql), dialect, tuple(order))
