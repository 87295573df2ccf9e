"""Logging in and out: one session per user, presence, and the login snapshot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clusterchat.errors import AlreadyLoggedIn, BadRequest
from clusterchat.protocol.events import kicked, message_event
from clusterchat.protocol.requests import Login
from clusterchat.services.accounts import AccountService
from clusterchat.services.hub import Hub
from clusterchat.services.social import FriendService, GroupService
from clusterchat.storage.inbox import MessageStore, MessageWriter
from clusterchat.storage.social import FriendStore

if TYPE_CHECKING:
    from clusterchat.session import Session

log = logging.getLogger(__name__)

OFFLINE_LIMIT = 500


class SessionService:
    def __init__(self, accounts: AccountService, friends: FriendService, friend_store: FriendStore,
                 groups: GroupService, messages: MessageStore, writer: MessageWriter, hub: Hub, *,
                 reject_duplicates: bool) -> None:
        self._accounts = accounts
        self._friends = friends
        self._friend_store = friend_store
        self._groups = groups
        self._messages = messages
        self._writer = writer
        self._hub = hub
        self._reject_duplicates = reject_duplicates
        # Called with a session just before it stops being its user's (logout, kick, disconnect).
        self.on_end: list[Callable[[Session], None]] = []

    async def login(self, session: Session, req: Login) -> dict[str, Any]:
        if session.user_id is not None:
            raise AlreadyLoggedIn("this connection is already logged in; log out first")
        if req.token is not None:
            user = await self._accounts.authenticate_token(req.token)
            token: str | None = req.token
        elif req.name is not None and req.password is not None:
            user = await self._accounts.authenticate(req.name, req.password)
            token = None
        else:
            raise BadRequest("field `name`: login needs `name` and `password`, or `token`")
        if session.closed:
            raise AlreadyLoggedIn("the connection closed during login")

        async with self._hub.login_lock(user.id):
            existing = self._hub.session_of(user.id)
            if existing is not None and existing is not session and self._reject_duplicates:
                raise AlreadyLoggedIn(f"{user.name} is logged in elsewhere")
            # In a cluster: the user's one entry in the online map, kicking (or refusing
            # for) a session on another node.
            await self._hub.claim(session, user.id, reject=self._reject_duplicates)
            if session.closed:
                self._hub.session_gone(session, user.id, (), announce=False)
                session.claim = None
                raise AlreadyLoggedIn("the connection closed during login")
            # From here to attach() nothing awaits, so two logins of one user cannot interleave.
            existing = self._hub.session_of(user.id)
            if existing is not None and existing is not session:
                self.kick(existing)
            session.user_id = user.id
            session.user_name = user.name
            session.begin_login()
            self._hub.attach(session)
        log.info("user %d logged in from %s", user.id, session.outlet.peer)
        try:
            if token is None:
                token = await self._accounts.issue_token(user.id)
            session.token = token
            friends = await self._friend_store.friends_of(user.id)
            session.friends = {f.id for f in friends}
            groups = await self._groups.groups_of(user.id)
            requests = await self._friend_store.pending_for(user.id)
            await self._writer.acks_saved(user.id)  # an ack of the session it replaced
            page = await self._messages.unacked(user.id, OFFLINE_LIMIT)
            online = await self._hub.online_among(session.friends)
        except BaseException:
            if self._hub.detach(session):
                self._hub.session_gone(session, user.id, (), announce=False)
            session.user_id = None
            session.token = None
            session.claim = None
            session.friends = set()
            session.end_session()
            raise
        self._hub.announce_presence(user.id, True, session.friends)
        last = page.messages[-1].seq if page.messages else page.acked_seq
        session.after_reply(lambda: session.end_login(last, page.more))
        return {
            "user": {"id": user.id, "name": user.name},
            "token": token,
            "friends": [{"id": f.id, "name": f.name, "online": f.id in online} for f in friends],
            "groups": groups,
            "friend_requests": [{"from": {"id": r.sender.id, "name": r.sender.name}, "note": r.note, "ts": r.ts}
                                for r in requests],
            "offline": [message_event(m) for m in page.messages],
            "more": page.more,
        }

    def kick(self, old: Session) -> None:
        """Close an older session of a user who logged in again; friends see no flicker."""
        user_id = old.user_id
        log.info("user %s logged in again: closing the older session from %s", user_id, old.outlet.peer)
        if self._hub.detach(old) and user_id is not None:
            self._hub.session_gone(old, user_id, (), announce=False)
        self._run_end_hooks(old)
        old.write(kicked())
        old.user_id = None
        old.claim = None
        old.end_session()
        old.close()

    async def logout(self, session: Session) -> None:
        token = session.token
        if token is not None:
            await self._accounts.revoke(token)
        self.end(session)

    def end(self, session: Session) -> None:
        """The session logs out or its connection is gone."""
        user_id = session.user_id
        if user_id is None:
            return
        self._run_end_hooks(session)
        if self._hub.detach(session):
            self._hub.session_gone(session, user_id, session.friends, announce=True)
            log.info("user %d logged out", user_id)
        session.user_id = None
        session.token = None
        session.claim = None
        session.friends = set()
        session.end_session()

    def _run_end_hooks(self, session: Session) -> None:
        for hook in self.on_end:
            try:
                hook(session)
            except Exception:
                log.exception("session end hook failed")
