"""PostgreSQL: a message batch in one round trip, a call of the `cc_store_batch` function.

Through the async driver every statement is a round trip, and each round trip waits for
a turn of the node's event loop before the next statement can start; under load a turn
takes a millisecond or more, so the statements of a batch set the latency of every
message in it (docs/design.md has the figures). The batch transaction (lock the
recipients' and ackers' inbox rows in user-id order, resolve retried cmids, take a block
of message ids from the counter, insert the messages, inbox rows and cmids, move the last
and acked seqs) is a PL/pgSQL function, created by migration 0003, and the writer calls it
outside any transaction block (`Database.run_autocommit`): the call is its own transaction
and commits before it returns.

The guarantees are those of the generic path (storage/inbox.py), statement for statement:
the function's comments and the migration's docstring say which. Every value travels as
a bound parameter, one array per column.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from clusterchat.storage.bulk import compile_sql
from clusterchat.storage.records import (
    CMID_WINDOW_MS,
    OutgoingMessage,
    StoredMessage,
    message_row,
    split_retries,
)

_ORDER = ("ts", "window", "sender", "to", "group", "lo", "hi", "text", "cmid", "r_send", "r_user", "a_user", "a_seq")
_CALL = "SELECT o_send, o_id, o_ts, o_duplicate, o_user, o_seq FROM cc_store_batch(" + ", ".join(
    f":{name}" for name in _ORDER) + ")"


class PgBatch:
    """The call of a message batch, compiled once for the PostgreSQL dialect."""

    def __init__(self, dialect: Any) -> None:
        self.call = compile_sql(text(_CALL), dialect, _ORDER)

    def write(self, cursor: Any, sends: list[OutgoingMessage], ack_seq: dict[int, int], ts: int) -> None:
        """Store `sends` and `ack_seq` in one call (its own transaction), setting each send's `stored`."""
        # A cmid sent twice within the batch: only the first goes to the database.
        firsts, twins = split_retries(sends, {})
        columns: tuple[list[Any], ...] = tuple([] for _ in range(6))
        cmids: list[str | None] = []
        recipient_send: list[int] = []
        recipient_user: list[int] = []
        for j, s in enumerate(firsts, 1):
            s.stored = None
            # The row as every path builds it (the pair for history); id and ts come from the call.
            for column, value in zip(columns, message_row(0, s.sender_id, s.to_user, s.group_id, s.text, ts)[1:7],
                                     strict=True):
                column.append(value)
            cmids.append(s.cmid)
            recipient_send.extend([j] * len(s.recipients))
            recipient_user.extend(s.recipients)
        ackers = sorted(ack_seq)
        cursor.execute(self.call, (ts, CMID_WINDOW_MS, *columns, cmids, recipient_send, recipient_user,
                                   ackers, [ack_seq[u] for u in ackers]))
        stored: dict[int, StoredMessage] = {}
        for j, message_id, message_ts, duplicate, user_id, seq in cursor.fetchall():
            result = stored.get(j)
            if result is None:
                result = stored[j] = StoredMessage(int(message_id), int(message_ts), [], duplicate=bool(duplicate))
            if user_id is not None:
                result.deliveries.append((int(user_id), int(seq)))
        for j, s in enumerate(firsts, 1):
            result = stored.get(j)
            if result is None:
                raise RuntimeError("the message_id counter is missing")
            if len(result.deliveries) > 1:  # in the order of the recipients, as the other paths give them
                order = {user_id: i for i, user_id in enumerate(s.recipients)}
                result.deliveries.sort(key=lambda delivery: order[delivery[0]])
            s.stored = result
        for twin, original in twins:
            assert original.stored is not None
            twin.stored = StoredMessage(original.stored.id, original.stored.ts, [], duplicate=True)
