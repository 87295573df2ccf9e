"""What nodes tell each other over Redis, and the names of the keys and channels they use.

Every bus payload is one msgspec Struct of a tagged union, encoded as MessagePack with
positional fields (`array_like`), behind the sending node's name and a NUL byte: a node
skips its own broadcasts by comparing a prefix, without decoding them. Frames meant for
clients (`frame` fields) are carried as the exact JSON line to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec


class WireMessage(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One committed message and its deliveries to users not on the sending node."""

    id: int
    sender_id: int
    sender_name: str
    to_user: int | None
    group_id: int | None
    text: str
    ts: int
    deliveries: list[int]  # user, seq, user, seq, ...


class Batch(msgspec.Struct, tag=1, array_like=True, frozen=True, gc=False):
    """The messages of one commit of a node's MessageWriter: one publish per commit batch."""

    messages: list[WireMessage]


class Presence(msgspec.Struct, tag=2, array_like=True, frozen=True, gc=False):
    user_id: int
    online: bool
    friends: list[int]  # those not on the sending node


class FriendChanged(msgspec.Struct, tag=3, array_like=True, frozen=True, gc=False):
    """`user_id` gained or lost `friend_id`: its session's friend set changes, it gets `frame`."""

    user_id: int
    friend_id: int
    added: bool
    frame: bytes


class GroupChanged(msgspec.Struct, tag=4, array_like=True, frozen=True, gc=False):
    """A group's members changed: every node drops its cached members; `notify` get `frame`."""

    group_id: int
    notify: list[int]
    frame: bytes


class Push(msgspec.Struct, tag=5, array_like=True, frozen=True, gc=False):
    """An event for some users, wherever they are connected."""

    user_ids: list[int]
    frame: bytes


class UsersGone(msgspec.Struct, tag=6, array_like=True, frozen=True, gc=False):
    """These users went offline with `node` (dead, stopped, or found stale): friends see it."""

    node: str
    user_ids: list[int]


class Kick(msgspec.Struct, tag=7, array_like=True, frozen=True, gc=False):
    """To one node: close the session of `user_id` whose claim is `claim` (logged in elsewhere)."""

    user_id: int
    claim: str


class RoomCreate(msgspec.Struct, tag=8, array_like=True, frozen=True, gc=False):
    """To one node: host a new room, answer `RoomCreated` to the asking node."""

    request_id: str
    name: str | None


class RoomCreated(msgspec.Struct, tag=9, array_like=True, frozen=True, gc=False):
    request_id: str
    room: dict[str, str | int] | None  # id, name, host, port, ws_url; None when it failed


class CatchUp(msgspec.Struct, tag=10, array_like=True, frozen=True, gc=False):
    """A node had to drop queued publishes (Redis was away too long): every node checks its
    sessions against their inboxes."""


Payload = Union[Batch, Presence, FriendChanged, GroupChanged, Push, UsersGone, Kick,  # noqa: UP007
                RoomCreate, RoomCreated, CatchUp]

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Payload] = msgspec.msgpack.Decoder(Payload)  # type: ignore[arg-type]
SEPARATOR = b"\x00"


def encode(origin: bytes, payload: Payload) -> bytes:
    """`origin` is the sending node's name followed by SEPARATOR (see `Names.origin`)."""
    return origin + _encoder.encode(payload)


def decode(data: bytes) -> tuple[str, Payload]:
    """The sending node's name and the payload; raises ValueError or msgspec errors if malformed."""
    cut = data.index(SEPARATOR)
    return data[:cut].decode(), _decoder.decode(memoryview(data)[cut + 1:])


def text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes: the clients do not decode)."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Names:
    """Redis keys and channels of one cluster, as seen from node `node`.

    Keys live in the Redis database of the URL. Pub/sub channels are not scoped by
    database, so the channels of a cluster on database N > 0 carry an `@N` suffix:
    two clusters may share one Redis server on different databases.
    """

    node: str
    db: int = 0

    def _channel(self, name: str) -> str:
        return name if self.db == 0 else f"{name}@{self.db}"

    @property
    def origin(self) -> bytes:
        return self.node.encode() + SEPARATOR

    @property
    def deliver(self) -> str:
        """The one broadcast channel: commit batches and every user event."""
        return self._channel("cc:deliver")

    def node_channel(self, node: str) -> str:
        """Requests for one node (kicks, room creation) and replies to it."""
        return self._channel(f"cc:node:{node}")

    @property
    def inbox(self) -> str:
        return self.node_channel(self.node)

    nodes = "cc:nodes"  # hash: node name -> JSON {name, host, port, ws_url, connections, rooms, ts}
    online = "cc:online"  # hash: user id -> "node claim"
    epoch = "cc:epoch"  # random, set once: a new value means Redis lost its data
    room_ids = "cc:room-ids"  # counter of room ids
    placements = "cc:room-rr"  # counter of round-robin placements

    @staticmethod
    def users_of(node: str) -> str:
        """Hash: user id -> claim, the users `node` has in `cc:online` (to reap them when it dies)."""
        return f"cc:users:{node}"

    @staticmethod
    def room(room_id: str) -> str:
        """String: the name of the node hosting the room."""
        return f"cc:room:{room_id}"

    @staticmethod
    def rooms_of(node: str) -> str:
        """Set: the rooms `node` hosts (to drop their keys when it dies)."""
        return f"cc:rooms:{node}"
