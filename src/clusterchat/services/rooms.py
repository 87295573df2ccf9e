"""Rooms (PROTOCOL.md section 7): ephemeral chat that lives in this node's memory.

A standalone node is the only live node, so it places every room on itself. In a
cluster a `RoomDirectory` (clusterchat.cluster.rooms) records which node hosts which
room, so a room op on the wrong node can name the right one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from clusterchat.clock import now_ms
from clusterchat.errors import NoSuchRoom, NotMember, WrongNode
from clusterchat.protocol.codec import event
from clusterchat.protocol.events import user_ref

if TYPE_CHECKING:
    from clusterchat.session import Session

EMPTY_ROOM_TTL = 60.0


@dataclass(slots=True)
class Room:
    id: str
    name: str
    members: dict[int, Session] = field(default_factory=dict)
    expiry: asyncio.TimerHandle | None = None


class RoomDirectory(Protocol):
    """Where the rooms of a cluster live."""

    def closed(self, room_id: str) -> None:
        """A room hosted here ended."""

    async def locate(self, room_id: str) -> dict[str, Any] | None:
        """`host`, `port` and `ws_url` of the live node hosting `room_id`, if another one does."""


Outcome = dict[str, Any] | None | Coroutine[Any, Any, NoReturn]


class RoomService:
    def __init__(self, address: dict[str, Any], directory: RoomDirectory | None = None) -> None:
        self._address = address  # host, port, ws_url of this node
        self._directory = directory
        self.rooms: dict[str, Room] = {}

    def room_dict(self, room: Room) -> dict[str, Any]:
        return {"id": room.id, "name": room.name, **self._address}

    def create(self, name: str | None, room_id: str | None = None) -> dict[str, Any]:
        """A new room on this node (with `room_id` when the cluster picked one)."""
        room_id = room_id or secrets.token_urlsafe(9)
        room = Room(room_id, name or room_id)
        room.expiry = asyncio.get_running_loop().call_later(EMPTY_ROOM_TTL, self._expire, room_id)
        self.rooms[room_id] = room
        return {"room": self.room_dict(room)}

    def _expire(self, room_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None and not room.members:
            self._end(room)

    def _end(self, room: Room) -> None:
        del self.rooms[room.id]
        if room.expiry is not None:
            room.expiry.cancel()
        if self._directory is not None:
            self._directory.closed(room.id)

    async def _elsewhere(self, room_id: str) -> NoReturn:
        """Not here: `wrong_node` with the hosting node's address, or `no_such_room`."""
        if self._directory is not None:
            address = await self._directory.locate(room_id)
            if address is not None:
                raise WrongNode(f"room {room_id!r} lives on another node; connect there", **address)
        raise NoSuchRoom(f"no room has id {room_id!r}")

    def join(self, session: Session, room_id: str) -> Outcome:
        room = self.rooms.get(room_id)
        if room is None:
            return self._elsewhere(room_id)
        me = session.user_id
        assert me is not None
        if room.expiry is not None:
            room.expiry.cancel()
            room.expiry = None
        if room.members.get(me) is not session:
            room.members[me] = session
            self._broadcast(room, me, event("room_member", {"room_id": room_id, "user": user_ref(me, session.user_name),
                                                            "joined": True}))
        members = [user_ref(uid, s.user_name) for uid, s in room.members.items()]
        return {"room": {**self.room_dict(room), "members": members}}

    def send(self, session: Session, room_id: str, text: str) -> Outcome:
        room = self.rooms.get(room_id)
        if room is None:
            return self._elsewhere(room_id)
        me = session.user_id
        if me not in room.members:
            raise NotMember(f"you are not in room {room_id!r}")
        ts = now_ms()
        self._broadcast(room, me, event("room_message", {"room_id": room_id, "from": user_ref(me, session.user_name),
                                                         "text": text, "ts": ts}))
        return {"ts": ts}

    def leave(self, session: Session, room_id: str) -> Outcome:
        room = self.rooms.get(room_id)
        if room is None:
            return self._elsewhere(room_id)
        me = session.user_id
        if me not in room.members:
            raise NotMember(f"you are not in room {room_id!r}")
        self._remove(room, me, session.user_name)
        return None

    def leave_all(self, user_id: int, name: str, session: Session) -> None:
        for room in list(self.rooms.values()):
            if room.members.get(user_id) is session:
                self._remove(room, user_id, name)

    def _remove(self, room: Room, user_id: int, name: str) -> None:
        del room.members[user_id]
        if not room.members:
            self._end(room)  # a room ends with its last member
            return
        self._broadcast(room, user_id, event("room_member", {"room_id": room.id, "user": user_ref(user_id, name),
                                                             "joined": False}))

    @staticmethod
    def _broadcast(room: Room, sender: int | None, frame: bytes) -> None:
        for uid, member in room.members.items():
            if uid != sender:
                member.write(frame)

    def close(self) -> None:
        for room in self.rooms.values():
            if room.expiry is not None:
                room.expiry.cancel()
        self.rooms.clear()
