"""Direct and group messages, acks, sync and history."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from clusterchat.errors import NoSuchUser, NotFriends, NotMember
from clusterchat.protocol.events import history_item, message_event
from clusterchat.protocol.requests import GroupSend, History, Send
from clusterchat.services.accounts import AccountService
from clusterchat.services.social import GroupService
from clusterchat.storage.inbox import MessageStore, MessageWriter, StoredMessage

if TYPE_CHECKING:
    from clusterchat.session import Session


class MessageService:
    def __init__(self, writer: MessageWriter, store: MessageStore, groups: GroupService,
                 accounts: AccountService) -> None:
        self._writer = writer
        self._store = store
        self._groups = groups
        self._accounts = accounts

    def send(self, session: Session, req: Send) -> asyncio.Future[StoredMessage] | Any:
        if req.to not in session.friends:
            return self._not_friends(req.to)
        assert session.user_id is not None
        return self._writer.send(session.user_id, session.user_name, to_user=req.to, group_id=None,
                                 recipients=(req.to,), text=req.text, cmid=req.cmid)

    async def _not_friends(self, user_id: int) -> None:
        if await self._accounts.name_of(user_id) is None:
            raise NoSuchUser(f"no user has id {user_id}")
        raise NotFriends(f"user {user_id} is not your friend")

    def group_send(self, session: Session, req: GroupSend) -> asyncio.Future[StoredMessage] | Any:
        members = self._groups.cached_members(req.group_id)
        if members is None:
            return self._group_send_slow(session, req)
        return self._group_send(session, req, members)

    async def _group_send_slow(self, session: Session, req: GroupSend) -> StoredMessage:
        members = await self._groups.members(req.group_id)
        return await self._group_send(session, req, members)

    def _group_send(self, session: Session, req: GroupSend, members: frozenset[int]) -> asyncio.Future[StoredMessage]:
        me = session.user_id
        assert me is not None
        if me not in members:
            raise NotMember(f"you are not a member of group {req.group_id}")
        recipients = sorted(m for m in members if m != me)
        return self._writer.send(me, session.user_name, to_user=None, group_id=req.group_id,
                                 recipients=recipients, text=req.text, cmid=req.cmid)

    def ack(self, session: Session, seq: int) -> None:
        assert session.user_id is not None
        self._writer.ack(session.user_id, seq)

    async def sync(self, session: Session, after: int, limit: int) -> dict[str, Any]:
        assert session.user_id is not None
        page = await self._store.since(session.user_id, after, limit)
        if not page.more:
            session.synced(page.last_seq)
        return {"messages": [message_event(m) for m in page.messages], "more": page.more}

    async def history(self, session: Session, req: History) -> dict[str, Any]:
        me = session.user_id
        assert me is not None
        if req.group_id is not None:
            if me not in await self._groups.members(req.group_id):
                raise NotMember(f"you are not a member of group {req.group_id}")
            rows = await self._store.history(group_id=req.group_id, before=req.before, limit=req.limit)
        else:
            assert req.with_ is not None
            if req.with_ not in session.friends:
                await self._not_friends(req.with_)
            rows = await self._store.history(user_id=me, peer=req.with_, before=req.before, limit=req.limit)
        return {"messages": [history_item(m) for m in rows]}
