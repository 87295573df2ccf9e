"""What the message writers and readers pass around: a send on its way, a stored message, an inbox row."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CMID_WINDOW_MS = 24 * 3600 * 1000  # a cmid is recognised for a day


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


def split_retries(sends: Sequence[OutgoingMessage], known: dict[tuple[int, str], tuple[int, int]]
                  ) -> tuple[list[OutgoingMessage], list[tuple[OutgoingMessage, OutgoingMessage]]]:
    """Sort out retried cmids: a send whose (sender, cmid) is `known` (-> (id, ts)) is
    answered with that message. Returns the sends to store, and the (twin, original) pairs
    of one new cmid sent twice within the batch (the twin gets the original's id)."""
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


def deliveries(recipients: Sequence[int], last_seq: dict[int, int]) -> list[tuple[int, int]]:
    """The (user, seq) of each recipient with an inbox, taking the next seq from `last_seq`."""
    out = []
    for user_id in recipients:
        seq = last_seq.get(user_id)
        if seq is None:
            continue  # no such user any more: nothing to deliver
        seq += 1
        last_seq[user_id] = seq
        out.append((user_id, seq))
    return out


def message_row(message_id: int, sender_id: int, to_user: int | None, group_id: int | None, text: str,
                ts: int) -> tuple[Any, ...]:
    """A `messages` row; a direct message also keeps its unordered pair (the history index)."""
    lo = hi = None
    if to_user is not None:
        lo, hi = min(sender_id, to_user), max(sender_id, to_user)
    return (message_id, sender_id, to_user, group_id, lo, hi, text, ts)
