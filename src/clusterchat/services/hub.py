"""Who is connected here, and getting events to them.

The hub is the one place that knows which session a user has. Services ask it to
push events to users; it writes to the local session. In a cluster the subclass
`clusterchat.cluster.hub.ClusterHub` is also where events for users on other nodes
leave through the bus, so the services never see Redis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from clusterchat.protocol.events import message_frame, message_tail, presence
from clusterchat.storage.inbox import OutgoingMessage

if TYPE_CHECKING:
    from clusterchat.session import Session

log = logging.getLogger(__name__)


class Hub:
    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}
        # Called with a group id whose membership changed on another node.
        self.group_listeners: list[Callable[[int], None]] = []

    def session_of(self, user_id: int) -> Session | None:
        return self.sessions.get(user_id)

    def attach(self, session: Session) -> None:
        assert session.user_id is not None
        self.sessions[session.user_id] = session

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the user's current one."""
        if session.user_id is not None and self.sessions.get(session.user_id) is session:
            del self.sessions[session.user_id]
            return True
        return False

    # ---- logins --------------------------------------------------------------------

    def login_lock(self, user_id: int) -> contextlib.AbstractAsyncContextManager[object]:
        """Held from the duplicate check to attach: two logins of one user do not interleave."""
        return contextlib.nullcontext()

    async def claim(self, session: Session, user_id: int, *, reject: bool) -> None:
        """Make `session` the user's one session (cluster-wide in a cluster); nothing to do here."""

    def session_gone(self, session: Session, user_id: int, friends: Iterable[int], *, announce: bool) -> None:
        """`session` stopped being `user_id`'s; friends see it go offline when `announce`."""
        if announce:
            self.announce_presence(user_id, False, friends)

    # ---- who is online ----------------------------------------------------------------

    async def online_among(self, user_ids: Iterable[int]) -> set[int]:
        """Those of `user_ids` that are online (anywhere in the cluster)."""
        sessions = self.sessions
        return {u for u in user_ids if u in sessions}

    # ---- events ------------------------------------------------------------------------

    def push(self, user_id: int, frame: bytes) -> None:
        session = self.sessions.get(user_id)
        if session is not None:
            session.write(frame)

    def push_many(self, user_ids: Iterable[int], frame: bytes) -> None:
        sessions = self.sessions
        for user_id in user_ids:
            session = sessions.get(user_id)
            if session is not None:
                session.write(frame)

    def announce_presence(self, user_id: int, online: bool, friends: Iterable[int]) -> None:
        self.push_many(friends, presence(user_id, online))

    async def friend_changed(self, user_id: int, friend_id: int, *, added: bool, frame: bytes) -> None:
        """`user_id` gained or lost `friend_id` as a friend: update its session, send it `frame`."""
        session = self.sessions.get(user_id)
        if session is not None:
            if added:
                session.friends.add(friend_id)
            else:
                session.friends.discard(friend_id)
            session.write(frame)

    async def group_changed(self, group_id: int, notify: Iterable[int], frame: bytes) -> None:
        """A group's membership changed here: tell `notify` with `frame` (and other nodes)."""
        self.push_many(notify, frame)

    def on_commit(self, stored: Sequence[OutgoingMessage]) -> None:
        """Deliver freshly committed messages to the recipients connected here."""
        sessions = self.sessions
        for message in stored:
            result = message.stored
            if result is None:
                continue
            tail = None
            for user_id, seq in result.deliveries:
                session = sessions.get(user_id)
                if session is None:
                    continue
                if tail is None:
                    tail = message_tail(result.id, message.sender_id, message.sender_name, message.to_user,
                                        message.group_id, message.text, result.ts)
                session.deliver(seq, message_frame(seq, tail))
