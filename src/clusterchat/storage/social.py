"""Friendships, friend requests, groups and their members."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from clusterchat.clock import now_ms
from clusterchat.storage.engine import Database
from clusterchat.storage.schema import (
    chat_groups,
    friend_requests,
    friendships,
    group_members,
    users,
)


@dataclass(frozen=True, slots=True)
class UserRef:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class PendingRequest:
    sender: UserRef
    note: str
    ts: int


@dataclass(slots=True)
class GroupRecord:
    id: int
    name: str
    desc: str
    creator_id: int
    members: list[tuple[UserRef, str]] = field(default_factory=list)  # (user, role)

    def role_of(self, user_id: int) -> str | None:
        for user, role in self.members:
            if user.id == user_id:
                return role
        return None


class FriendStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def friends_of(self, user_id: int) -> list[UserRef]:
        query = (
            select(users.c.id, users.c.name)
            .select_from(friendships.join(users, users.c.id == friendships.c.friend_id))
            .where(friendships.c.user_id == user_id)
            .order_by(users.c.id)
        )
        async with self._db.reader.connect() as conn:
            return [UserRef(r.id, r.name) for r in await conn.execute(query)]

    async def pending_for(self, user_id: int) -> list[PendingRequest]:
        query = (
            select(users.c.id, users.c.name, friend_requests.c.note, friend_requests.c.ts)
            .select_from(friend_requests.join(users, users.c.id == friend_requests.c.from_id))
            .where(friend_requests.c.to_id == user_id)
            .order_by(friend_requests.c.ts)
        )
        async with self._db.reader.connect() as conn:
            return [PendingRequest(UserRef(r.id, r.name), r.note, r.ts) for r in await conn.execute(query)]

    async def has_request(self, from_id: int, to_id: int) -> bool:
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(select(friend_requests.c.ts).where(
                friend_requests.c.from_id == from_id, friend_requests.c.to_id == to_id
            ))).first()
        return row is not None

    async def put_request(self, from_id: int, to_id: int, note: str) -> int:
        """Store (or refresh) a request; returns its ts."""
        ts = now_ms()
        async with self._db.writer.begin() as conn:
            updated = await conn.execute(update(friend_requests).where(
                friend_requests.c.from_id == from_id, friend_requests.c.to_id == to_id
            ).values(note=note, ts=ts))
            if not updated.rowcount:
                await conn.execute(insert(friend_requests).values(
                    from_id=from_id, to_id=to_id, note=note, ts=ts
                ))
        return ts

    async def delete_request(self, from_id: int, to_id: int) -> bool:
        async with self._db.writer.begin() as conn:
            result = await conn.execute(delete(friend_requests).where(
                friend_requests.c.from_id == from_id, friend_requests.c.to_id == to_id
            ))
        return bool(result.rowcount)

    async def befriend(self, a: int, b: int) -> bool:
        """Make a and b friends and drop requests between them; False if they already were."""
        now = now_ms()
        try:
            async with self._db.writer.begin() as conn:
                await conn.execute(delete(friend_requests).where(
                    ((friend_requests.c.from_id == a) & (friend_requests.c.to_id == b))
                    | ((friend_requests.c.from_id == b) & (friend_requests.c.to_id == a))
                ))
                await conn.execute(insert(friendships), [
                    {"user_id": a, "friend_id": b, "created_at": now},
                    {"user_id": b, "friend_id": a, "created_at": now},
                ])
        except IntegrityError:
            return False
        return True

    async def unfriend(self, a: int, b: int) -> bool:
        async with self._db.writer.begin() as conn:
            result = await conn.execute(delete(friendships).where(
                ((friendships.c.user_id == a) & (friendships.c.friend_id == b))
                | ((friendships.c.user_id == b) & (friendships.c.friend_id == a))
            ))
        return bool(result.rowcount)


class GroupStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, creator: int, name: str, desc: str) -> int:
        now = now_ms()
        async with self._db.writer.begin() as conn:
            result = await conn.execute(insert(chat_groups).values(
                name=name, description=desc, creator_id=creator, created_at=now
            ))
            group_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            await conn.execute(insert(group_members).values(
                group_id=group_id, user_id=creator, role="creator", joined_at=now
            ))
        return group_id

    async def get(self, group_id: int) -> GroupRecord | None:
        groups = await self._load(chat_groups.c.id == group_id)
        return groups[0] if groups else None

    async def groups_of(self, user_id: int) -> list[GroupRecord]:
        mine = select(group_members.c.group_id).where(group_members.c.user_id == user_id)
        return await self._load(chat_groups.c.id.in_(mine))

    async def _load(self, where: object) -> list[GroupRecord]:
        async with self._db.reader.connect() as conn:
            rows = await conn.execute(
                select(chat_groups.c.id, chat_groups.c.name, chat_groups.c.description,
                       chat_groups.c.creator_id).where(where).order_by(chat_groups.c.id)  # type: ignore[arg-type]
            )
            groups = {r.id: GroupRecord(r.id, r.name, r.description, r.creator_id) for r in rows}
            if groups:
                members = await conn.execute(
                    select(group_members.c.group_id, group_members.c.role, users.c.id, users.c.name)
                    .select_from(group_members.join(users, users.c.id == group_members.c.user_id))
                    .where(group_members.c.group_id.in_(list(groups)))
                    .order_by(group_members.c.group_id, group_members.c.joined_at, users.c.id)
                )
                for m in members:
                    groups[m.group_id].members.append((UserRef(m.id, m.name), m.role))
        return list(groups.values())

    async def member_ids(self, group_id: int) -> list[int] | None:
        """The members of a group, or None when there is no such group."""
        async with self._db.reader.connect() as conn:
            exists = (await conn.execute(
                select(func.count()).select_from(chat_groups).where(chat_groups.c.id == group_id)
            )).scalar_one()
            if not exists:
                return None
            rows = await conn.execute(
                select(group_members.c.user_id).where(group_members.c.group_id == group_id)
            )
            return [r.user_id for r in rows]

    async def join(self, group_id: int, user_id: int) -> bool:
        """Add a member; False if it already was one."""
        try:
            async with self._db.writer.begin() as conn:
                await conn.execute(insert(group_members).values(
                    group_id=group_id, user_id=user_id, role="member", joined_at=now_ms()
                ))
        except IntegrityError:
            return False
        return True

    async def leave(self, group_id: int, user_id: int) -> bool:
        async with self._db.writer.begin() as conn:
            result = await conn.execute(delete(group_members).where(
                and_(group_members.c.group_id == group_id, group_members.c.user_id == user_id)
            ))
        return bool(result.rowcount)
