"""Friends and groups."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clusterchat.clock import now_ms
from clusterchat.errors import AlreadyFriends, BadRequest, NoSuchGroup, NoSuchUser, NotFriends, NotMember
from clusterchat.protocol.codec import event
from clusterchat.protocol.events import user_ref
from clusterchat.services.hub import Hub
from clusterchat.storage.social import FriendStore, GroupRecord, GroupStore

if TYPE_CHECKING:
    from clusterchat.services.accounts import AccountService
    from clusterchat.session import Session


class FriendService:
    def __init__(self, store: FriendStore, accounts: AccountService, hub: Hub) -> None:
        self._store = store
        self._accounts = accounts
        self._hub = hub

    async def friend_list(self, user_id: int) -> list[dict[str, Any]]:
        friends = await self._store.friends_of(user_id)
        online = await self._hub.online_among(f.id for f in friends)
        return [{"id": f.id, "name": f.name, "online": f.id in online} for f in friends]

    async def request(self, session: Session, target: int, note: str) -> dict[str, Any] | None:
        me = _me(session)
        if target == me:
            raise BadRequest("field `user_id`: you cannot befriend yourself")
        if target in session.friends:
            raise AlreadyFriends(f"user {target} is already your friend")
        if await self._accounts.name_of(target) is None:
            raise NoSuchUser(f"no user has id {target}")
        if await self._store.has_request(target, me):
            # They asked us first: this request accepts theirs.
            await self._befriend(session, target)
            return None
        ts = await self._store.put_request(me, target, note)
        self._hub.push(target, event("friend_request",
                                     {"from": user_ref(me, session.user_name), "note": note, "ts": ts}))
        return None

    async def accept(self, session: Session, asker: int) -> dict[str, Any]:
        me = _me(session)
        if asker in session.friends:
            raise AlreadyFriends(f"user {asker} is already your friend")
        if await self._accounts.name_of(asker) is None:
            raise NoSuchUser(f"no user has id {asker}")
        if not await self._store.has_request(asker, me):
            raise BadRequest(f"field `user_id`: user {asker} has not asked to be your friend")
        friend = await self._befriend(session, asker)
        return {"friend": friend}

    async def _befriend(self, session: Session, other: int) -> dict[str, Any]:
        me = _me(session)
        name = await self._accounts.name_of(other)
        if name is None:
            raise NoSuchUser(f"no user has id {other}")
        if not await self._store.befriend(me, other):
            session.friends.add(other)
            raise AlreadyFriends(f"user {other} is already your friend")
        session.friends.add(other)
        # The one who asked learns of it by event (its friend set grows with it, wherever it
        # is connected); so does the other side when both asked.
        await self._hub.friend_changed(other, me, added=True, frame=event(
            "friend_added", {"friend": {"id": me, "name": session.user_name, "online": True}}))
        return {"id": other, "name": name, "online": other in await self._hub.online_among((other,))}

    async def reject(self, session: Session, asker: int) -> None:
        await self._store.delete_request(asker, _me(session))

    async def unfriend(self, session: Session, other: int) -> None:
        me = _me(session)
        if not await self._store.unfriend(me, other):
            session.friends.discard(other)
            if await self._accounts.name_of(other) is None:
                raise NoSuchUser(f"no user has id {other}")
            raise NotFriends(f"user {other} is not your friend")
        session.friends.discard(other)
        await self._hub.friend_changed(other, me, added=False, frame=event("friend_removed", {"user_id": me}))


class GroupService:
    """Groups, with a cache of member ids so group sends need no query."""

    def __init__(self, store: GroupStore, hub: Hub, cache_size: int = 10000) -> None:
        self._store = store
        self._hub = hub
        self._members: dict[int, frozenset[int]] = {}
        self._versions: dict[int, int] = {}  # bumped by every change, so a slow load can't cache stale members
        self._cache_size = cache_size

    @staticmethod
    def group_dict(group: GroupRecord, viewer: int, online: set[int]) -> dict[str, Any]:
        return {
            "id": group.id, "name": group.name, "desc": group.desc, "role": group.role_of(viewer),
            "members": [{"id": u.id, "name": u.name, "role": role, "online": u.id in online}
                        for u, role in group.members],
        }

    async def _described(self, groups: list[GroupRecord], viewer: int) -> list[dict[str, Any]]:
        online = await self._hub.online_among({u.id for g in groups for u, _ in g.members})
        return [self.group_dict(g, viewer, online) for g in groups]

    async def groups_of(self, user_id: int) -> list[dict[str, Any]]:
        return await self._described(await self._store.groups_of(user_id), user_id)

    def cached_members(self, group_id: int) -> frozenset[int] | None:
        return self._members.get(group_id)

    async def members(self, group_id: int) -> frozenset[int]:
        cached = self._members.get(group_id)
        if cached is not None:
            return cached
        version = self._versions.get(group_id, 0)
        ids = await self._store.member_ids(group_id)
        if ids is None:
            raise NoSuchGroup(f"no group has id {group_id}")
        members = frozenset(ids)
        if self._versions.get(group_id, 0) == version:
            if len(self._members) >= self._cache_size:
                self._members.pop(next(iter(self._members)))
            self._members[group_id] = members
        return members

    def forget(self, group_id: int) -> None:
        self._members.pop(group_id, None)
        self._versions[group_id] = self._versions.get(group_id, 0) + 1

    async def create(self, session: Session, name: str, desc: str) -> dict[str, Any]:
        me = _me(session)
        group_id = await self._store.create(me, name, desc)
        self.forget(group_id)
        group = await self._store.get(group_id)
        assert group is not None
        return {"group": (await self._described([group], me))[0]}

    async def join(self, session: Session, group_id: int) -> dict[str, Any]:
        me = _me(session)
        if await self._store.get(group_id) is None:
            raise NoSuchGroup(f"no group has id {group_id}")
        joined = await self._store.join(group_id, me)
        self.forget(group_id)
        group = await self._store.get(group_id)
        if group is None:
            raise NoSuchGroup(f"no group has id {group_id}")
        if joined:
            await self._announce(group_id, group, session, joined=True)
        return {"group": (await self._described([group], me))[0]}

    async def leave(self, session: Session, group_id: int) -> None:
        me = _me(session)
        group = await self._store.get(group_id)
        if group is None:
            raise NoSuchGroup(f"no group has id {group_id}")
        if not await self._store.leave(group_id, me):
            raise NotMember(f"you are not a member of group {group_id}")
        self.forget(group_id)
        await self._announce(group_id, group, session, joined=False)

    async def _announce(self, group_id: int, group: GroupRecord, session: Session, *, joined: bool) -> None:
        me = _me(session)
        frame = event("group_member", {"group_id": group_id, "user": user_ref(me, session.user_name), "joined": joined})
        await self._hub.group_changed(group_id, [u.id for u, _ in group.members if u.id != me], frame)


def _me(session: Session) -> int:
    assert session.user_id is not None
    return session.user_id


__all__ = ["FriendService", "GroupService", "now_ms"]
