"""Users and login tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from clusterchat.clock import now_ms
from clusterchat.storage.engine import Database
from clusterchat.storage.schema import inbox_state, tokens, users


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    name: str
    password_hash: str


class NameExists(Exception):
    pass


def token_digest(token: str) -> str:
    """Tokens are stored only as their SHA-256, so a database leak reveals no live token."""
    return hashlib.sha256(token.encode()).hexdigest()


class UserStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, password_hash: str) -> int:
        try:
            async with self._db.writer.begin() as conn:
                result = await conn.execute(
                    insert(users).values(name=name, password_hash=password_hash, created_at=now_ms())
                )
                user_id = int(result.inserted_primary_key[0])  # type: ignore[index]
                await conn.execute(insert(inbox_state).values(user_id=user_id, last_seq=0, acked_seq=0))
        except IntegrityError as exc:
            raise NameExists(name) from exc
        return user_id

    async def by_name(self, name: str) -> UserRecord | None:
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(
                select(users.c.id, users.c.name, users.c.password_hash).where(users.c.name == name)
            )).first()
        return UserRecord(row.id, row.name, row.password_hash) if row else None

    async def name_of(self, user_id: int) -> str | None:
        async with self._db.reader.connect() as conn:
            return (await conn.execute(
                select(users.c.name).where(users.c.id == user_id)
            )).scalar_one_or_none()


class TokenStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, token: str, user_id: int, ttl_ms: int) -> None:
        now = now_ms()
        async with self._db.writer.begin() as conn:
            await conn.execute(insert(tokens).values(
                token_hash=token_digest(token), user_id=user_id, created_at=now, expires_at=now + ttl_ms
            ))

    async def resolve(self, token: str) -> UserRecord | None:
        """The user a live token belongs to, or None for an unknown or expired one."""
        query = (
            select(users.c.id, users.c.name, users.c.password_hash)
            .select_from(tokens.join(users, users.c.id == tokens.c.user_id))
            .where(tokens.c.token_hash == token_digest(token), tokens.c.expires_at > now_ms())
        )
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(query)).first()
        return UserRecord(row.id, row.name, row.password_hash) if row else None

    async def revoke(self, token: str) -> None:
        async with self._db.writer.begin() as conn:
            await conn.execute(delete(tokens).where(tokens.c.token_hash == token_digest(token)))

    async def purge_expired(self) -> int:
        async with self._db.writer.begin() as conn:
            result = await conn.execute(delete(tokens).where(tokens.c.expires_at <= now_ms()))
        return int(result.rowcount or 0)
