"""The newest seq of many inboxes at once: what a node reads to catch its sessions up
after it could not hear the cluster for a while."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from clusterchat.storage.engine import Database
from clusterchat.storage.schema import inbox_state

_CHUNK = 500


class InboxHeads:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def last_seqs(self, user_ids: Sequence[int]) -> dict[int, int]:
        """user -> the last seq handed out in its inbox (users without an inbox are left out)."""
        heads: dict[int, int] = {}
        async with self._db.reader.connect() as conn:
            for start in range(0, len(user_ids), _CHUNK):
                chunk = list(user_ids[start:start + _CHUNK])
                rows = await conn.execute(
                    select(inbox_state.c.user_id, inbox_state.c.last_seq).where(inbox_state.c.user_id.in_(chunk)))
                heads.update((int(row.user_id), int(row.last_seq)) for row in rows)
        return heads
