"""Who is connected here, and getting events to them.

The hub is the one place that knows which session a user has. Services ask it to
push events to users; it writes to the local session. (In a cluster it is also where
events for users on other nodes leave through the bus.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from clusterchat.protocol.events import message_frame, message_tail, presence
from clusterchat.storage.inbox import OutgoingMessage

if TYPE_CHECKING:
    from clusterchat.session import Session

log = logging.getLogger(__name__)


class Hub:
    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}

    def session_of(self, user_id: int) -> Session | None:
        return self.sessions.get(user_id)

    def is_online(self, user_id: int) -> bool:
        return user_id in self.sessions

    def attach(self, session: Session) -> None:
        assert session.user_id is not None
        self.sessions[session.user_id] = session

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the user's current one."""
        if session.user_id is not None and self.sessions.get(session.user_id) is session:
            del self.sessions[session.user_id]
            return True
        return False

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
