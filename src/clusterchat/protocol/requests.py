"""Typed requests of PROTOCOL.md section 4: one frozen msgspec Struct per op, tagged by `op`.

Field constraints live in the types, so the decoder validates while it parses and the
services receive only well-formed values.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_ID = 2**53

Rid = str | int | None
NAME_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]+\Z"
# NUL is refused in stored strings (text, notes, cmids): PostgreSQL cannot store it, and no chat needs it.
NO_NUL_PATTERN = r"^[^\x00]*\Z"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=NAME_PATTERN)]
Password = Annotated[str, msgspec.Meta(min_length=6, max_length=128)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_NUL_PATTERN)]
Note = Annotated[str, msgspec.Meta(max_length=256, pattern=NO_NUL_PATTERN)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Cmid = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL_PATTERN)]
Id = Annotated[int, msgspec.Meta(ge=1, lt=MAX_ID)]
Seq = Annotated[int, msgspec.Meta(ge=0, lt=MAX_ID)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
RoomId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Request(msgspec.Struct, frozen=True, tag_field="op", kw_only=True):
    rid: Rid = None

    # Ops a connection may pipeline: they neither depend on nor change what the
    # requests after them see, so their replies may still be pending while later
    # requests start (replies stay in request order).
    pipelined = False
    needs_login = True


class Register(Request, frozen=True, tag="register", kw_only=True):
    name: Name
    password: Password
    needs_login = False


class Login(Request, frozen=True, tag="login", kw_only=True):
    name: Name | None = None
    password: Password | None = None
    token: Token | None = None
    needs_login = False


class Logout(Request, frozen=True, tag="logout", kw_only=True):
    pass


class Ping(Request, frozen=True, tag="ping", kw_only=True):
    pipelined = True
    needs_login = False


class Lookup(Request, frozen=True, tag="lookup", kw_only=True):
    name: Name


class FriendRequest(Request, frozen=True, tag="friend_request", kw_only=True):
    user_id: Id
    note: Note = ""


class FriendAccept(Request, frozen=True, tag="friend_accept", kw_only=True):
    user_id: Id


class FriendReject(Request, frozen=True, tag="friend_reject", kw_only=True):
    user_id: Id


class Unfriend(Request, frozen=True, tag="unfriend", kw_only=True):
    user_id: Id


class Friends(Request, frozen=True, tag="friends", kw_only=True):
    pass


class CreateGroup(Request, frozen=True, tag="create_group", kw_only=True):
    name: Name
    desc: Note = ""


class JoinGroup(Request, frozen=True, tag="join_group", kw_only=True):
    group_id: Id


class LeaveGroup(Request, frozen=True, tag="leave_group", kw_only=True):
    group_id: Id


class Groups(Request, frozen=True, tag="groups", kw_only=True):
    pass


class Send(Request, frozen=True, tag="send", kw_only=True):
    to: Id
    text: Text
    cmid: Cmid | None = None
    pipelined = True


class GroupSend(Request, frozen=True, tag="group_send", kw_only=True):
    group_id: Id
    text: Text
    cmid: Cmid | None = None
    pipelined = True


class Ack(Request, frozen=True, tag="ack", kw_only=True):
    seq: Seq
    pipelined = True


class Sync(Request, frozen=True, tag="sync", kw_only=True):
    after: Seq
    limit: Limit = 100


class History(Request, frozen=True, tag="history", kw_only=True):
    with_: Id | None = msgspec.field(default=None, name="with")
    group_id: Id | None = None
    before: Id | None = None
    limit: Limit = 50


class CreateRoom(Request, frozen=True, tag="create_room", kw_only=True):
    name: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class JoinRoom(Request, frozen=True, tag="join_room", kw_only=True):
    room_id: RoomId


class RoomSend(Request, frozen=True, tag="room_send", kw_only=True):
    room_id: RoomId
    text: Text


class LeaveRoom(Request, frozen=True, tag="leave_room", kw_only=True):
    room_id: RoomId


ALL_REQUESTS: tuple[type[Request], ...] = (
    Register, Login, Logout, Ping, Lookup,
    FriendRequest, FriendAccept, FriendReject, Unfriend, Friends,
    CreateGroup, JoinGroup, LeaveGroup, Groups,
    Send, GroupSend, Ack, Sync, History,
    CreateRoom, JoinRoom, RoomSend, LeaveRoom,
)  # fmt: skip

OPS: frozenset[str] = frozenset(
    msgspec.inspect.type_info(cls).tag for cls in ALL_REQUESTS  # type: ignore[attr-defined]
)
