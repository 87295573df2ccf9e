"""decode_request and the reply/event encoders (PROTOCOL.md sections 2-5), no sockets."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clusterchat.errors import BadRequest, ErrorCode, NotFriends, WrongNode
from clusterchat.protocol import requests as rq
from clusterchat.protocol.codec import (
    RequestError,
    decode_request,
    error_event,
    event,
    op_of,
    reply_error,
    reply_ok,
)

MAX_ID = 2**53


def frame(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def decode(obj: Any) -> rq.Request:
    return decode_request(frame(obj))


def fails(data: bytes | str) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_request(data)
    return info.value


def fails_obj(obj: Any) -> RequestError:
    return fails(frame(obj))


def line(data: bytes) -> dict[str, Any]:
    """One JSON object on one line ended by \\n."""
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    obj = json.loads(data)
    assert isinstance(obj, dict)
    return obj


# ---- the op table -------------------------------------------------------------------

DOCUMENTED_OPS = {
    "register", "login", "logout", "ping", "lookup",
    "friend_request", "friend_accept", "friend_reject", "unfriend", "friends",
    "create_group", "join_group", "leave_group", "groups",
    "send", "group_send", "ack", "sync", "history",
    "create_room", "join_room", "room_send", "leave_room",
}  # fmt: skip


def test_the_decoder_knows_exactly_the_documented_ops() -> None:
    assert set(rq.OPS) == DOCUMENTED_OPS


def test_only_register_login_and_ping_work_logged_out() -> None:
    assert {msgspec.inspect.type_info(c).tag for c in rq.ALL_REQUESTS if not c.needs_login} == {  # type: ignore[attr-defined]
        "register", "login", "ping",
    }


def test_pipelined_ops_are_exactly_send_group_send_ack_ping() -> None:
    assert {msgspec.inspect.type_info(c).tag for c in rq.ALL_REQUESTS if c.pipelined} == {  # type: ignore[attr-defined]
        "send", "group_send", "ack", "ping",
    }


# ---- every op, valid ------------------------------------------------------------------

VALID: list[tuple[dict[str, Any], type[rq.Request], dict[str, Any]]] = [
    ({"op": "register", "name": "alice", "password": "secret1"}, rq.Register,
     {"name": "alice", "password": "secret1"}),
    ({"op": "login", "name": "alice", "password": "secret1"}, rq.Login,
     {"name": "alice", "password": "secret1", "token": None}),
    ({"op": "login", "token": "3q2+7w=="}, rq.Login, {"token": "3q2+7w==", "name": None, "password": None}),
    ({"op": "logout"}, rq.Logout, {}),
    ({"op": "ping"}, rq.Ping, {}),
    ({"op": "lookup", "name": "bob"}, rq.Lookup, {"name": "bob"}),
    ({"op": "friend_request", "user_id": 42}, rq.FriendRequest, {"user_id": 42, "note": ""}),
    ({"op": "friend_request", "user_id": 42, "note": "hi"}, rq.FriendRequest, {"user_id": 42, "note": "hi"}),
    ({"op": "friend_accept", "user_id": 3}, rq.FriendAccept, {"user_id": 3}),
    ({"op": "friend_reject", "user_id": 3}, rq.FriendReject, {"user_id": 3}),
    ({"op": "unfriend", "user_id": 3}, rq.Unfriend, {"user_id": 3}),
    ({"op": "friends"}, rq.Friends, {}),
    ({"op": "create_group", "name": "team"}, rq.CreateGroup, {"name": "team", "desc": ""}),
    ({"op": "create_group", "name": "team", "desc": "our team"}, rq.CreateGroup,
     {"name": "team", "desc": "our team"}),
    ({"op": "join_group", "group_id": 9}, rq.JoinGroup, {"group_id": 9}),
    ({"op": "leave_group", "group_id": 9}, rq.LeaveGroup, {"group_id": 9}),
    ({"op": "groups"}, rq.Groups, {}),
    ({"op": "send", "to": 42, "text": "hi"}, rq.Send, {"to": 42, "text": "hi", "cmid": None}),
    ({"op": "send", "to": 42, "text": "hi", "cmid": "c-1"}, rq.Send, {"to": 42, "text": "hi", "cmid": "c-1"}),
    ({"op": "group_send", "group_id": 9, "text": "hi all"}, rq.GroupSend,
     {"group_id": 9, "text": "hi all", "cmid": None}),
    ({"op": "group_send", "group_id": 9, "text": "x", "cmid": "c" * 64}, rq.GroupSend,
     {"group_id": 9, "text": "x", "cmid": "c" * 64}),
    ({"op": "ack", "seq": 5}, rq.Ack, {"seq": 5}),
    ({"op": "ack", "seq": 0}, rq.Ack, {"seq": 0}),
    ({"op": "sync", "after": 0}, rq.Sync, {"after": 0, "limit": 100}),
    ({"op": "sync", "after": 17, "limit": 5}, rq.Sync, {"after": 17, "limit": 5}),
    ({"op": "history", "with": 42}, rq.History, {"with_": 42, "group_id": None, "before": None, "limit": 50}),
    ({"op": "history", "with": 42, "before": 1001, "limit": 10}, rq.History,
     {"with_": 42, "group_id": None, "before": 1001, "limit": 10}),
    ({"op": "history", "group_id": 9, "limit": 100}, rq.History,
     {"with_": None, "group_id": 9, "before": None, "limit": 100}),
    ({"op": "create_room"}, rq.CreateRoom, {"name": None}),
    ({"op": "create_room", "name": "lobby"}, rq.CreateRoom, {"name": "lobby"}),
    ({"op": "join_room", "room_id": "r-1"}, rq.JoinRoom, {"room_id": "r-1"}),
    ({"op": "room_send", "room_id": "r-1", "text": "yo"}, rq.RoomSend, {"room_id": "r-1", "text": "yo"}),
    ({"op": "leave_room", "room_id": "r-1"}, rq.LeaveRoom, {"room_id": "r-1"}),
]


def test_valid_table_covers_every_op() -> None:
    assert {obj["op"] for obj, _, _ in VALID} == DOCUMENTED_OPS


@pytest.mark.parametrize(("obj", "cls", "fields"), VALID, ids=[f"{o['op']}-{i}" for i, (o, _, _) in enumerate(VALID)])
@pytest.mark.parametrize("rid", [None, 7, 0, -3, "r-7", ""], ids=repr)
def test_valid_request_decodes(obj: dict[str, Any], cls: type[rq.Request], fields: dict[str, Any],
                               rid: str | int | None) -> None:
    if rid is not None:
        obj = {**obj, "rid": rid}
    req = decode(obj)
    assert type(req) is cls
    assert op_of(req) == obj["op"]
    assert req.rid == rid
    assert type(req.rid) is type(rid)
    for name, value in fields.items():
        assert getattr(req, name) == value, name


@pytest.mark.parametrize(("obj", "cls", "fields"), VALID, ids=[f"{o['op']}-{i}" for i, (o, _, _) in enumerate(VALID)])
def test_unknown_extra_fields_are_ignored(obj: dict[str, Any], cls: type[rq.Request], fields: dict[str, Any]) -> None:
    extra = {"zzz": [1, {"a": None}], "client": "x/1.0", "Op": "nope", "ok": True, "event": "message"}
    req = decode({**extra, **obj, "rid": "x"})
    assert type(req) is cls
    assert req.rid == "x"
    for name, value in fields.items():
        assert getattr(req, name) == value


def test_decode_accepts_str_frames_and_field_order_does_not_matter() -> None:
    req = decode_request('{"text": "hi", "rid": 1, "to": 2, "op": "send"}')
    assert req == rq.Send(rid=1, to=2, text="hi")


def test_explicit_null_rid_and_optional_fields() -> None:
    req = decode({"op": "send", "rid": None, "to": 1, "text": "x", "cmid": None})
    assert req == rq.Send(to=1, text="x")
    assert decode({"op": "history", "with": None, "group_id": 4}) == rq.History(group_id=4)


def test_big_integer_rid_is_kept_exactly() -> None:
    assert decode({"op": "ping", "rid": 2**70}).rid == 2**70


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "a" * 32), ("name", "é" * 32), ("name", "名前"), ("name", "a.b-c_d!@#"), ("name", "x")],
)
def test_name_bounds_and_characters_accepted(field: str, value: str) -> None:
    assert decode({"op": "lookup", field: value}).name == value  # type: ignore[attr-defined]


def test_boundaries_accepted() -> None:
    assert decode({"op": "register", "name": "a", "password": "p" * 6}).password == "p" * 6  # type: ignore[attr-defined]
    assert decode({"op": "register", "name": "a", "password": "p" * 128}).password == "p" * 128  # type: ignore[attr-defined]
    assert decode({"op": "send", "to": 1, "text": "t" * 4096}).text == "t" * 4096  # type: ignore[attr-defined]
    assert decode({"op": "send", "to": 1, "text": "é" * 4096}).text == "é" * 4096  # type: ignore[attr-defined]  # characters, not bytes
    assert decode({"op": "send", "to": 1, "text": "line 1\nline 2\t\x01"}).text == "line 1\nline 2\t\x01"  # type: ignore[attr-defined]
    # NUL is refused: PostgreSQL cannot store it.
    with pytest.raises(RequestError, match="`text`: must not contain the NUL character"):
        decode({"op": "send", "to": 1, "text": "a\x00b"})
    with pytest.raises(RequestError, match="`cmid`: must not contain the NUL character"):
        decode({"op": "group_send", "group_id": 1, "text": "x", "cmid": "\x00"})
    assert decode({"op": "friend_request", "user_id": 1, "note": "n" * 256}).note == "n" * 256  # type: ignore[attr-defined]
    assert decode({"op": "create_group", "name": "g", "desc": "d" * 256}).desc == "d" * 256  # type: ignore[attr-defined]
    assert decode({"op": "sync", "after": 0, "limit": 1}).limit == 1  # type: ignore[attr-defined]
    assert decode({"op": "history", "with": 1, "limit": 100}).limit == 100  # type: ignore[attr-defined]
    assert decode({"op": "send", "to": MAX_ID - 1, "text": "x"}).to == MAX_ID - 1  # type: ignore[attr-defined]
    assert decode({"op": "send", "to": 1, "text": "x", "cmid": "c"}).cmid == "c"  # type: ignore[attr-defined]


# ---- bad_json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"{", b'{"op": "ping"', b'{"op": "ping"}}', b"{'op': 'ping'}", b'{"op": ping}',
     b"\xff\xfe{}", b'{"op": "ping", "rid": "\xc3"}', b'{"op": "send", "to": 1, "text": "\xed\xa0\x80"}',
     b'{"op": "ping", "rid": "\\ud800"}', b"[]", b'[{"op": "ping"}]', b"1", b"-2.5", b"1e400", b'"ping"',
     b"null", b"true", b"false"],
    ids=repr,
)
def test_bad_json(data: bytes) -> None:
    err = fails(data)
    assert err.error.code is ErrorCode.BAD_JSON
    assert err.rid is None
    assert err.op is None
    assert err.error.message


def test_bad_json_becomes_an_error_event() -> None:
    err = fails(b"[1, 2]")
    assert line(error_event(err.error)) == {
        "event": "error", "error": {"code": "bad_json", "message": err.error.message},
    }


# ---- bad_request ---------------------------------------------------------------------


def assert_bad_request(obj: dict[str, Any], field: str) -> RequestError:
    err = fails_obj(obj)
    assert err.error.code is ErrorCode.BAD_REQUEST, err.error.message
    assert f"`{field}`" in err.error.message, err.error.message
    return err


def test_missing_op() -> None:
    err = assert_bad_request({"rid": 5, "to": 1}, "op")
    assert err.rid == 5
    assert err.op is None


@pytest.mark.parametrize("op", [None, 5, True, ["send"], {"x": 1}, 1.5], ids=repr)
def test_op_not_a_string(op: Any) -> None:
    err = fails_obj({"op": op, "rid": "a"})
    assert err.error.code is ErrorCode.BAD_REQUEST
    assert "`op`" in err.error.message
    assert err.rid == "a"
    assert err.op is None


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"op": "register", "password": "secret1"}, "name"),
        ({"op": "register", "name": "alice"}, "password"),
        ({"op": "lookup"}, "name"),
        ({"op": "friend_request"}, "user_id"),
        ({"op": "friend_accept"}, "user_id"),
        ({"op": "friend_reject"}, "user_id"),
        ({"op": "unfriend"}, "user_id"),
        ({"op": "create_group"}, "name"),
        ({"op": "join_group"}, "group_id"),
        ({"op": "leave_group"}, "group_id"),
        ({"op": "send", "text": "x"}, "to"),
        ({"op": "send", "to": 1}, "text"),
        ({"op": "group_send", "text": "x"}, "group_id"),
        ({"op": "group_send", "group_id": 1}, "text"),
        ({"op": "ack"}, "seq"),
        ({"op": "sync"}, "after"),
        ({"op": "join_room"}, "room_id"),
        ({"op": "room_send", "text": "x"}, "room_id"),
        ({"op": "room_send", "room_id": "r"}, "text"),
        ({"op": "leave_room"}, "room_id"),
    ],
)
def test_missing_field_is_named(obj: dict[str, Any], field: str) -> None:
    err = assert_bad_request({**obj, "rid": 9}, field)
    assert "missing" in err.error.message
    assert err.rid == 9
    assert err.op == obj["op"]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"op": "register", "name": 5, "password": "secret1"}, "name"),
        ({"op": "register", "name": "alice", "password": 123456}, "password"),
        ({"op": "login", "token": 5}, "token"),
        ({"op": "lookup", "name": ["bob"]}, "name"),
        ({"op": "friend_request", "user_id": "3"}, "user_id"),
        ({"op": "friend_request", "user_id": 3, "note": 5}, "note"),
        ({"op": "create_group", "name": "g", "desc": None}, "desc"),
        ({"op": "send", "to": "bob", "text": "x"}, "to"),
        ({"op": "send", "to": 1, "text": {"t": "x"}}, "text"),
        ({"op": "send", "to": 1, "text": "x", "cmid": 5}, "cmid"),
        ({"op": "group_send", "group_id": None, "text": "x"}, "group_id"),
        ({"op": "ack", "seq": "5"}, "seq"),
        ({"op": "sync", "after": 0, "limit": "10"}, "limit"),
        ({"op": "history", "with": "bob"}, "with"),
        ({"op": "history", "with": 1, "before": "x"}, "before"),
        ({"op": "join_room", "room_id": 5}, "room_id"),
        ({"op": "send", "to": 1, "text": "x", "rid": 1.5}, "rid"),
        ({"op": "send", "to": 1, "text": "x", "rid": True}, "rid"),
        ({"op": "send", "to": 1, "text": "x", "rid": [1]}, "rid"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_type_names_the_field(obj: dict[str, Any], field: str) -> None:
    err = assert_bad_request(obj, field)
    assert err.op == obj["op"]


@pytest.mark.parametrize("name", ["", "a" * 33, "é" * 33], ids=len)
def test_name_length_out_of_range(name: str) -> None:
    assert_bad_request({"op": "register", "name": name, "password": "secret1"}, "name")
    assert_bad_request({"op": "lookup", "name": name}, "name")
    assert_bad_request({"op": "create_group", "name": name}, "name")


@pytest.mark.parametrize(
    "name",
    ["a b", " ab", "ab ", "a\tb", "a\nb", "ab\n", "a\rb", "a\x00b", "\x01", "a\x1fb", "a\x7fb", "a\x85b", "a\x9fb",
     "a\u00a0b", "a\u2028b", "a\u3000b"],
    ids=repr,
)
def test_name_with_whitespace_or_control_characters(name: str) -> None:
    assert_bad_request({"op": "register", "name": name, "password": "secret1"}, "name")
    assert_bad_request({"op": "login", "name": name, "password": "secret1"}, "name")


@pytest.mark.parametrize("length", [0, 5, 129])
def test_password_length_out_of_range(length: int) -> None:
    assert_bad_request({"op": "register", "name": "alice", "password": "p" * length}, "password")
    assert_bad_request({"op": "login", "name": "alice", "password": "p" * length}, "password")


@pytest.mark.parametrize("length", [0, 4097])
def test_text_length_out_of_range(length: int) -> None:
    assert_bad_request({"op": "send", "to": 1, "text": "t" * length}, "text")
    assert_bad_request({"op": "group_send", "group_id": 1, "text": "t" * length}, "text")
    assert_bad_request({"op": "room_send", "room_id": "r", "text": "t" * length}, "text")


def test_note_and_desc_too_long() -> None:
    assert_bad_request({"op": "friend_request", "user_id": 1, "note": "n" * 257}, "note")
    assert_bad_request({"op": "create_group", "name": "g", "desc": "d" * 257}, "desc")


@pytest.mark.parametrize("limit", [0, 101, -1])
def test_limit_out_of_range(limit: int) -> None:
    assert_bad_request({"op": "sync", "after": 0, "limit": limit}, "limit")
    assert_bad_request({"op": "history", "with": 1, "limit": limit}, "limit")


@pytest.mark.parametrize("length", [0, 65])
def test_cmid_length_out_of_range(length: int) -> None:
    assert_bad_request({"op": "send", "to": 1, "text": "x", "cmid": "c" * length}, "cmid")
    assert_bad_request({"op": "group_send", "group_id": 1, "text": "x", "cmid": "c" * length}, "cmid")


ID_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"op": "send", "text": "x"}, "to"),
    ({"op": "group_send", "text": "x"}, "group_id"),
    ({"op": "friend_request"}, "user_id"),
    ({"op": "friend_accept"}, "user_id"),
    ({"op": "friend_reject"}, "user_id"),
    ({"op": "unfriend"}, "user_id"),
    ({"op": "join_group"}, "group_id"),
    ({"op": "leave_group"}, "group_id"),
    ({"op": "history"}, "with"),
    ({"op": "history"}, "group_id"),
    ({"op": "history", "with": 1}, "before"),
]


@pytest.mark.parametrize(("base", "field"), ID_FIELDS, ids=[f"{b['op']}.{f}" for b, f in ID_FIELDS])
@pytest.mark.parametrize("value", [0, MAX_ID, MAX_ID + 1, 2**64, -1, True, False, 1.0, 2.5, "1"], ids=repr)
def test_bad_ids(base: dict[str, Any], field: str, value: Any) -> None:
    assert_bad_request({**base, field: value}, field)


@pytest.mark.parametrize(("base", "field"), ID_FIELDS, ids=[f"{b['op']}.{f}" for b, f in ID_FIELDS])
@pytest.mark.parametrize("value", [1, MAX_ID - 1])
def test_good_ids(base: dict[str, Any], field: str, value: int) -> None:
    req = decode({**base, field: value})
    assert getattr(req, "with_" if field == "with" else field) == value


@pytest.mark.parametrize(("op", "field"), [("ack", "seq"), ("sync", "after")])
@pytest.mark.parametrize("value", [-1, MAX_ID, True, 1.0], ids=repr)
def test_bad_seqs(op: str, field: str, value: Any) -> None:
    assert_bad_request({"op": op, field: value}, field)


def test_room_ids_are_strings() -> None:
    assert_bad_request({"op": "join_room", "room_id": ""}, "room_id")
    assert_bad_request({"op": "join_room", "room_id": "r" * 65}, "room_id")


# ---- unknown_op -------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["nope", "", "SEND", "send ", "Ping", "x" * 10_000])
def test_unknown_op(op: str) -> None:
    err = fails_obj({"op": op, "rid": 3})
    assert err.error.code is ErrorCode.UNKNOWN_OP
    assert err.op == op
    assert err.rid == 3
    assert len(err.error.message) < 200  # a huge op is not echoed whole


def test_unknown_op_wins_over_missing_fields() -> None:
    assert fails_obj({"op": "teleport", "to": "x"}).error.code is ErrorCode.UNKNOWN_OP


# ---- rid echo ------------------------------------------------------------------------------

BAD_FRAMES: list[dict[str, Any]] = [
    {"to": 1},  # missing op
    {"op": 5},  # op not a string
    {"op": "nope"},  # unknown op
    {"op": "send", "to": 0, "text": "x"},  # out of range
    {"op": "send", "text": "x"},  # missing field
]


@pytest.mark.parametrize("obj", BAD_FRAMES, ids=repr)
@pytest.mark.parametrize("rid", [7, 0, -1, 2**60, "r-7", ""], ids=repr)
def test_rid_is_echoed_in_errors_when_str_or_int(obj: dict[str, Any], rid: str | int) -> None:
    err = fails_obj({**obj, "rid": rid})
    assert err.rid == rid
    assert type(err.rid) is type(rid)
    reply = line(reply_error(err.op, err.rid, err.error.body()))
    assert reply["rid"] == rid
    assert reply["ok"] is False


@pytest.mark.parametrize("obj", BAD_FRAMES, ids=repr)
@pytest.mark.parametrize("rid", [None, True, False, 1.5, [1], {"a": 1}], ids=repr)
def test_rid_is_dropped_in_errors_otherwise(obj: dict[str, Any], rid: Any) -> None:
    err = fails_obj({**obj, "rid": rid})
    assert err.rid is None
    assert "rid" not in line(reply_error(err.op, err.rid, err.error.body()))


def test_error_reply_carries_the_op_when_it_named_one() -> None:
    err = fails_obj({"op": "send", "rid": 1, "to": 0, "text": "x"})
    reply = line(reply_error(err.op, err.rid, err.error.body()))
    assert reply["op"] == "send"
    assert reply["error"]["code"] == "bad_request"
    assert "`to`" in reply["error"]["message"]


# ---- hostile input ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [10_000, 100_000])
@pytest.mark.parametrize(("open_", "close"), [(b"[", b"]"), (b'{"a":', b"}")], ids=["arrays", "objects"])
@pytest.mark.parametrize("where", ["known", "unknown", "top"])
def test_deep_nesting_is_an_error_not_a_crash(depth: int, open_: bytes, close: bytes, where: str) -> None:
    inner = open_ * depth + (b"1" if open_ != b"[" else b"") + close * depth
    if where == "known":
        data = b'{"op":"send","rid":1,"to":1,"text":' + inner + b"}"
    elif where == "unknown":
        data = b'{"op":"send","rid":1,"to":1,"text":"x","junk":' + inner + b"}"
    else:
        data = inner
    err = fails(data)
    assert err.error.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_REQUEST)


def test_moderate_nesting_in_an_unknown_field_is_ignored() -> None:
    data = b'{"op":"ping","rid":1,"junk":' + b"[" * 100 + b"]" * 100 + b"}"
    assert decode_request(data) == rq.Ping(rid=1)


def test_huge_numbers_are_an_error_not_a_crash() -> None:
    for data in (b'{"op":"send","to":' + b"9" * 5000 + b',"text":"x"}', b'{"op":"ping","rid":1e999}', b"9" * 5000):
        assert fails(data).error.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_REQUEST)


# ---- fuzz ----------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)

_FIELDS_OF = {
    msgspec.inspect.type_info(cls).tag: cls  # type: ignore[attr-defined]
    for cls in rq.ALL_REQUESTS
}
_ALL_FIELD_NAMES = sorted({f.encode_name for cls in rq.ALL_REQUESTS for f in msgspec.structs.fields(cls)})


def _check_error(err: RequestError, obj: Any) -> None:
    """What any RequestError must look like for the input `obj` (None when not JSON)."""
    assert err.error.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP)
    assert isinstance(err.error.message, str) and err.error.message
    if not isinstance(obj, dict):
        assert err.error.code is ErrorCode.BAD_JSON
        assert err.rid is None
        return
    rid = obj.get("rid")
    expected_rid = rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
    assert err.rid == expected_rid
    op = obj.get("op")
    if not isinstance(op, str):
        assert err.error.code is ErrorCode.BAD_REQUEST
        assert "`op`" in err.error.message
    elif op not in rq.OPS:
        assert err.error.code is ErrorCode.UNKNOWN_OP
        assert err.op == op
    else:
        assert err.error.code is ErrorCode.BAD_REQUEST
        assert err.op == op
        named = re.match(r"field `([^`]*)`", err.error.message)
        assert named, err.error.message
        assert named.group(1) in {f.encode_name for f in msgspec.structs.fields(_FIELDS_OF[op])}
    reply = line(reply_error(err.op, err.rid, err.error.body()))
    assert reply["ok"] is False
    assert reply["error"]["code"] == err.error.code.value


@settings(max_examples=500)
@given(data=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        req = decode_request(data)
    except RequestError as err:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        assert err.error.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP)
        if not isinstance(obj, dict):
            assert err.error.code is ErrorCode.BAD_JSON
    else:
        assert isinstance(req, rq.Request)


@settings(max_examples=500)
@given(value=json_values)
def test_fuzz_arbitrary_json_values(value: Any) -> None:
    try:
        req = decode(value)
    except RequestError as err:
        _check_error(err, value)
    else:
        assert isinstance(value, dict)
        assert op_of(req) == value["op"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=st.sampled_from(sorted(rq.OPS)) | _text,
    fields=st.dictionaries(st.sampled_from([*_ALL_FIELD_NAMES, "rid", "junk"]), json_values, max_size=5),
)
def test_fuzz_request_shaped_objects(op: str, fields: dict[str, Any]) -> None:
    obj = {"op": op, **fields}
    try:
        req = decode(obj)
    except RequestError as err:
        _check_error(err, obj)
    else:
        assert op_of(req) == op
        assert req.rid == obj.get("rid")
        for f in msgspec.structs.fields(type(req)):
            if f.encode_name in obj:
                assert getattr(req, f.name) == obj[f.encode_name]


# valid requests, generated from the documented field types
_names = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=32)
_ids = st.integers(min_value=1, max_value=MAX_ID - 1)
_seqs = st.integers(min_value=0, max_value=MAX_ID - 1)
_any_text = st.characters(exclude_categories=["Cs"])
_stored_text = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")  # NUL is refused
_texts = st.text(alphabet=_stored_text, min_size=1, max_size=4096)
_notes = st.text(alphabet=_stored_text, max_size=256)
_cmids = st.text(alphabet=_stored_text, min_size=1, max_size=64)
_limits = st.integers(min_value=1, max_value=100)
_rooms = st.text(alphabet=_any_text, min_size=1, max_size=64)
_rids = st.none() | st.integers() | st.text(alphabet=_any_text, max_size=20)

VALID_SHAPES: dict[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, st.SearchStrategy[Any]]]] = {
    "register": ({"name": _names, "password": st.text(alphabet=_any_text, min_size=6, max_size=128)}, {}),
    "login": ({}, {"name": _names, "password": st.text(alphabet=_any_text, min_size=6, max_size=128),
                   "token": st.text(alphabet=_any_text, min_size=1, max_size=256)}),
    "logout": ({}, {}),
    "ping": ({}, {}),
    "lookup": ({"name": _names}, {}),
    "friend_request": ({"user_id": _ids}, {"note": _notes}),
    "friend_accept": ({"user_id": _ids}, {}),
    "friend_reject": ({"user_id": _ids}, {}),
    "unfriend": ({"user_id": _ids}, {}),
    "friends": ({}, {}),
    "create_group": ({"name": _names}, {"desc": _notes}),
    "join_group": ({"group_id": _ids}, {}),
    "leave_group": ({"group_id": _ids}, {}),
    "groups": ({}, {}),
    "send": ({"to": _ids, "text": _texts}, {"cmid": _cmids}),
    "group_send": ({"group_id": _ids, "text": _texts}, {"cmid": _cmids}),
    "ack": ({"seq": _seqs}, {}),
    "sync": ({"after": _seqs}, {"limit": _limits}),
    "history": ({}, {"with": _ids, "group_id": _ids, "before": _ids, "limit": _limits}),
    "create_room": ({}, {"name": st.text(alphabet=_any_text, max_size=64)}),
    "join_room": ({"room_id": _rooms}, {}),
    "room_send": ({"room_id": _rooms, "text": _texts}, {}),
    "leave_room": ({"room_id": _rooms}, {}),
}


def test_valid_shapes_cover_every_op() -> None:
    assert set(VALID_SHAPES) == DOCUMENTED_OPS


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(sorted(VALID_SHAPES)))
    required, optional = VALID_SHAPES[op]
    obj: dict[str, Any] = {"op": op, "rid": draw(_rids)}
    obj.update(draw(st.fixed_dictionaries(required, optional=optional)))
    obj.update(draw(st.dictionaries(st.sampled_from(["junk", "extra", "zz"]), json_values, max_size=2)))
    return obj


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(obj=valid_requests())
def test_fuzz_valid_requests_decode(obj: dict[str, Any]) -> None:
    req = decode(obj)
    assert op_of(req) == obj["op"]
    assert req.rid == obj["rid"]
    for f in msgspec.structs.fields(type(req)):
        if f.encode_name in obj:
            assert getattr(req, f.name) == obj[f.encode_name]


@settings(max_examples=300)
@given(obj=valid_requests(), field=st.sampled_from(_ALL_FIELD_NAMES), value=json_values)
def test_fuzz_one_field_changed(obj: dict[str, Any], field: str, value: Any) -> None:
    obj = {**obj, field: value}
    try:
        decode(obj)
    except RequestError as err:
        _check_error(err, obj)
        assume(err.error.code is ErrorCode.BAD_REQUEST)
        assert f"`{field}`" in err.error.message  # only `field` changed, so only it can be wrong


# ---- replies and events --------------------------------------------------------------------


def test_reply_ok_shape() -> None:
    data = reply_ok("send", 7, {"id": 1001, "ts": 1763700000123})
    assert line(data) == {"op": "send", "rid": 7, "ok": True, "id": 1001, "ts": 1763700000123}
    assert data.startswith(b'{"op":"send","rid":7,"ok":true')


@pytest.mark.parametrize("rid", [0, "", "r", -5, 2**70])
def test_reply_ok_echoes_falsy_and_big_rids(rid: str | int) -> None:
    assert line(reply_ok("ping", rid))["rid"] == rid


def test_reply_ok_without_rid_or_body() -> None:
    assert line(reply_ok("logout", None)) == {"op": "logout", "ok": True}
    assert line(reply_ok("logout", None, {})) == {"op": "logout", "ok": True}


def test_reply_ok_text_with_newlines_stays_on_one_line() -> None:
    body = {"messages": [{"text": "a\nb\r\n\u2028c"}]}
    assert line(reply_ok("sync", "x", body))["messages"] == body["messages"]


def test_reply_error_shape() -> None:
    err = NotFriends("user 42 is not your friend")
    assert line(reply_error("send", 7, err.body())) == {
        "op": "send", "rid": 7, "ok": False,
        "error": {"code": "not_friends", "message": "user 42 is not your friend"},
    }


def test_reply_error_without_op_or_rid() -> None:
    assert line(reply_error(None, None, BadRequest("field `op` is missing").body())) == {
        "ok": False, "error": {"code": "bad_request", "message": "field `op` is missing"},
    }


def test_reply_error_keeps_extra_error_fields() -> None:
    body = WrongNode(host="10.0.0.2", port=7000, ws_url="ws://10.0.0.2:7001/ws").body()
    reply = line(reply_error("join_room", "j", body))
    assert reply["error"] == {"code": "wrong_node", "message": WrongNode.default_message,
                              "host": "10.0.0.2", "port": 7000, "ws_url": "ws://10.0.0.2:7001/ws"}


def test_event_shape() -> None:
    data = event("presence", {"user_id": 3, "online": True})
    assert line(data) == {"event": "presence", "user_id": 3, "online": True}
    assert data.startswith(b'{"event":"presence"')
    assert "ok" not in line(data)


def test_error_event_shape() -> None:
    assert line(error_event(BadRequest("nope"))) == {"event": "error", "error": {"code": "bad_request",
                                                                                 "message": "nope"}}


@settings(max_examples=200)
@given(rid=_rids, body=st.dictionaries(st.text(alphabet=_any_text, max_size=8).filter(
    lambda k: k not in ("op", "rid", "ok", "event")), json_values, max_size=4))
def test_fuzz_replies_and_events_are_one_json_line(rid: str | int | None, body: dict[str, Any]) -> None:
    reply = line(reply_ok("sync", rid, body))
    assert reply == {"op": "sync", **({"rid": rid} if rid is not None else {}), "ok": True, **body}
    error = line(reply_error("sync", rid, {"code": "internal", "message": "x"}))
    assert error["ok"] is False and ("rid" in error) == (rid is not None)
    assert line(event("x", body)) == {"event": "x", **body}
