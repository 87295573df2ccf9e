"""Accounts and the envelope (PROTOCOL.md sections 1-4): register, login, logout, ping, lookup,
and the session-level error codes, over real sockets on every database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from clusterchat.client import ChatClient, ConnectionClosed
from support.node import NodeProcess
from support.users import PASSWORD, Chat, drain, make_friends, quiet

LOGIN_FIELDS = {"op", "rid", "ok", "user", "token", "friends", "groups", "friend_requests", "offline", "more"}


def now_ms() -> int:
    return int(time.time() * 1000)


async def request_with_rid(client: ChatClient, rid: str | int, op: str, **fields: Any) -> dict[str, Any]:
    """A request with a rid of our choosing."""
    future = client.expect_reply(rid)
    await client.send_raw(json.dumps({"op": op, "rid": rid, **fields}).encode() + b"\n")
    return await asyncio.wait_for(future, 10)


def assert_error(reply: dict[str, Any], code: str, field: str | None = None) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply
    if field is not None:
        assert field in reply["error"]["message"], reply


# --------------------------------------------------------------------------- register


async def test_register_gives_user_ids_and_refuses_a_taken_name(chat: Chat) -> None:
    c = await chat.connect()
    first = await c.call("register", name="alice", password=PASSWORD)
    second = await c.call("register", name="bob", password=PASSWORD)
    assert set(first) == {"op", "rid", "ok", "user_id"}
    assert isinstance(first["user_id"], int) and 1 <= first["user_id"] < 2**53
    assert second["user_id"] != first["user_id"]

    taken = await c.request("register", name="alice", password="another-password")
    assert_error(taken, "name_taken")
    assert taken["op"] == "register" and taken["rid"] is not None
    # The failed registration changed nothing: alice keeps her password and id.
    login = await c.call("login", name="alice", password=PASSWORD)
    assert login["user"] == {"id": first["user_id"], "name": "alice"}
    bad = await (await chat.connect()).request("login", name="alice", password="another-password")
    assert_error(bad, "bad_credentials")


async def test_register_validates_name_and_password(chat: Chat) -> None:
    c = await chat.connect()
    bad_names: list[Any] = ["", "a" * 33, "has space", "tab\there", "new\nline", "ctl\x01x", "nbsp\u00a0x", 42, None]
    for name in bad_names:
        reply = await c.request("register", name=name, password=PASSWORD)
        assert_error(reply, "bad_request", "name")
    assert_error(await c.request("register", password=PASSWORD), "bad_request", "name")
    bad_passwords: list[Any] = ["12345", "p" * 129, 123456, None]
    for password in bad_passwords:
        reply = await c.request("register", name="carol", password=password)
        assert_error(reply, "bad_request", "password")
    assert_error(await c.request("register", name="carol"), "bad_request", "password")

    # The limits themselves are accepted.
    for name, password in [("c", "123456"), ("d" * 32, "p" * 128), ("ünïcødé_名前", "pässwörd✓")]:
        user_id = (await c.call("register", name=name, password=password))["user_id"]
        other = await chat.connect()
        login = await other.call("login", name=name, password=password)
        assert login["user"] == {"id": user_id, "name": name}
    assert_error(await c.request("register", name="ünïcødé_名前", password=PASSWORD), "name_taken")
    # None of the refused registrations created its user.
    assert (await c.call("register", name="carol", password=PASSWORD))["ok"] is True


# --------------------------------------------------------------------------- login


async def test_login_reply_has_exactly_the_documented_fields(chat: Chat) -> None:
    user_id = await chat.register("alice")
    c = await chat.connect()
    reply = await request_with_rid(c, "login-1", "login", name="alice", password=PASSWORD)
    assert reply["ok"] is True and reply["op"] == "login" and reply["rid"] == "login-1"
    assert set(reply) == LOGIN_FIELDS
    assert reply["user"] == {"id": user_id, "name": "alice"}
    assert isinstance(reply["token"], str) and len(reply["token"]) >= 16
    assert PASSWORD not in reply["token"]
    assert reply["friends"] == [] and reply["groups"] == [] and reply["friend_requests"] == []
    assert reply["offline"] == [] and reply["more"] is False


async def test_token_login_on_another_connection_and_logout_revokes_it(chat: Chat) -> None:
    alice_id = await chat.register("alice")
    first = await chat.connect()
    token = (await first.call("login", name="alice", password=PASSWORD))["token"]

    second = await chat.connect(websocket=True)
    reply = await second.call("login", token=token)
    assert set(reply) == LOGIN_FIELDS
    assert reply["user"] == {"id": alice_id, "name": "alice"} and reply["token"] == token
    # The same user logged in again: the older session is kicked and closed (section 6).
    assert (await first.next_event("kicked"))["reason"] == "logged_in_elsewhere"
    await asyncio.wait_for(first.closed.wait(), 5)
    assert (await second.call("lookup", name="alice"))["user"]["id"] == alice_id

    await second.call("logout")
    third = await chat.connect()
    assert_error(await third.request("login", token=token), "bad_credentials")
    assert_error(await third.request("login", token="not-a-token-at-all"), "bad_credentials")
    assert_error(await third.request("login", token="x" * 43), "bad_credentials")
    # A password login still works and hands out a fresh token.
    fresh = await third.call("login", name="alice", password=PASSWORD)
    assert fresh["token"] != token
    fourth = await chat.connect()
    assert (await fourth.call("login", token=fresh["token"]))["user"]["id"] == alice_id


async def test_wrong_password_and_unknown_name_are_bad_credentials(chat: Chat) -> None:
    await chat.register("alice")
    c = await chat.connect()
    wrong = await c.request("login", name="alice", password="wrong-password")
    unknown = await c.request("login", name="nobody", password=PASSWORD)
    assert_error(wrong, "bad_credentials")
    assert_error(unknown, "bad_credentials")
    assert "wrong-password" not in wrong["error"]["message"]
    # The same answer for both, so it does not tell which names exist.
    assert wrong["error"]["message"] == unknown["error"]["message"]
    # Still logged out after the failures; a correct login then works on the same connection.
    assert_error(await c.request("friends"), "not_logged_in")
    assert_error(await c.request("login", name="alice"), "bad_request")
    assert (await c.call("login", name="alice", password=PASSWORD))["user"]["name"] == "alice"


async def test_already_logged_in_and_logout(chat: Chat) -> None:
    await chat.register("bob")
    alice = await chat.user("alice")
    assert_error(await alice.request("login", name="alice", password=PASSWORD), "already_logged_in")
    assert_error(await alice.request("login", name="bob", password=PASSWORD), "already_logged_in")
    assert_error(await alice.request("login", token=alice.login["token"]), "already_logged_in")
    # Still alice, and bob was not logged in by the refused request.
    assert (await alice.call("groups"))["groups"] == []
    assert (await (await chat.login("bob")).call("friends"))["friends"] == []

    # Logout: the connection stays open, logged out.
    reply = await alice.call("logout")
    assert set(reply) == {"op", "rid", "ok"}
    assert_error(await alice.request("friends"), "not_logged_in")
    assert_error(await alice.request("logout"), "not_logged_in")
    assert (await alice.call("ping"))["ts"] > 0
    assert not alice.client.closed.is_set()
    # The same connection can log in again, as anyone.
    await alice.call("register", name="carol", password=PASSWORD)
    assert (await alice.call("login", name="carol", password=PASSWORD))["user"]["name"] == "carol"


# --------------------------------------------------------------------------- before login, ping, lookup


async def test_every_op_but_register_login_ping_needs_login(chat: Chat) -> None:
    c = await chat.connect()
    before = now_ms()
    pong = await request_with_rid(c, 99, "ping")
    after = now_ms()
    assert set(pong) == {"op", "rid", "ok", "ts"} and pong["rid"] == 99
    assert before - 2000 <= pong["ts"] <= after + 2000

    requests: dict[str, dict[str, Any]] = {
        "logout": {},
        "lookup": {"name": "alice"},
        "friend_request": {"user_id": 1, "note": "hi"},
        "friend_accept": {"user_id": 1},
        "friend_reject": {"user_id": 1},
        "unfriend": {"user_id": 1},
        "friends": {},
        "create_group": {"name": "team"},
        "join_group": {"group_id": 1},
        "leave_group": {"group_id": 1},
        "groups": {},
        "send": {"to": 1, "text": "hi"},
        "group_send": {"group_id": 1, "text": "hi"},
        "ack": {"seq": 1},
        "sync": {"after": 0},
        "history": {"with": 1},
        "create_room": {"name": "r"},
        "join_room": {"room_id": "abc"},
        "room_send": {"room_id": "abc", "text": "hi"},
        "leave_room": {"room_id": "abc"},
    }
    replies = await asyncio.gather(*(c.request(op, **fields) for op, fields in requests.items()))
    for op, reply in zip(requests, replies, strict=True):
        assert reply["op"] == op
        assert_error(reply, "not_logged_in")
    # None of them did anything: no user, no group was created.
    user_id = (await c.call("register", name="alice", password=PASSWORD))["user_id"]
    login = await c.call("login", name="alice", password=PASSWORD)
    assert login["user"]["id"] == user_id and login["groups"] == []
    assert (await c.call("groups"))["groups"] == []


async def test_lookup_finds_users_by_name(chat: Chat) -> None:
    alice = await chat.user("alice")
    bob_id = await chat.register("bob")
    found = await alice.call("lookup", name="bob")
    assert set(found) == {"op", "rid", "ok", "user"}
    assert found["user"] == {"id": bob_id, "name": "bob"}
    assert (await alice.call("lookup", name="alice"))["user"] == {"id": alice.id, "name": "alice"}
    assert_error(await alice.request("lookup", name="Bob"), "no_such_user")
    assert_error(await alice.request("lookup", name="nobody"), "no_such_user")
    assert_error(await alice.request("lookup", name="has space"), "bad_request", "name")
    assert_error(await alice.request("lookup"), "bad_request", "name")


# --------------------------------------------------------------------------- envelope and framing


async def test_envelope_errors_and_framing(chat: Chat) -> None:
    c = await chat.connect()
    # Several frames in one write, blank lines between them, replies in request order.
    futures = [c.expect_reply("a"), c.expect_reply("b")]
    await c.send_raw(b'{"op":"ping","rid":"a"}\n\n  \n{"op":"ping","rid":"b"}\n')
    replies = await asyncio.gather(*futures)
    assert [r["rid"] for r in replies] == ["a", "b"] and all(r["ok"] for r in replies)

    assert_error(await c.request(""), "unknown_op")
    fut = c.expect_reply("no-op")
    await c.send_raw(b'{"rid": "no-op", "to": 1}\n')
    assert_error(await asyncio.wait_for(fut, 5), "bad_request", "op")
    assert_error(await c.request("fly_to_the_moon"), "unknown_op")
    # Unknown extra fields are ignored.
    assert (await c.call("ping", extra={"x": [1, 2]}, also=True))["ok"] is True

    for junk in [b"not json\n", b"[1, 2]\n", b"42\n", b'"str"\n', b"\xff\xfe{}\n", b'{"op": "ping"\n']:
        await c.send_raw(junk)
        ev = await c.next_event("error", timeout=5)
        assert ev["error"]["code"] == "bad_json", junk
    assert (await c.call("ping"))["ok"] is True  # the connection stayed open
    assert drain(c) == []

    # A frame of exactly max_frame (65536 by default, newline excluded) is read ...
    prefix, suffix = b'{"op":"ping","rid":"max","pad":"', b'"}'
    frame = prefix + b"x" * (65536 - len(prefix) - len(suffix)) + suffix
    assert len(frame) == 65536
    fut = c.expect_reply("max")
    await c.send_raw(frame + b"\n")
    assert (await asyncio.wait_for(fut, 5))["ok"] is True
    ws = await chat.connect(websocket=True)
    assert (await ws.call("ping", pad="y" * 60000))["ok"] is True

    # ... one over it gets an error event, then the connection closes.
    big = await chat.connect()
    await big.send_raw(b'{"op":"ping","pad":"' + b"x" * 70000 + b'"}\n')
    ev = await big.next_event("error", timeout=5)
    assert ev["error"]["code"] == "frame_too_large"
    await asyncio.wait_for(big.closed.wait(), 5)
    with pytest.raises(ConnectionClosed):
        await big.request("ping")
    assert (await c.call("ping"))["ok"] is True
    # The same over WebSocket.
    await ws.send_raw("[]")
    assert (await ws.next_event("error", timeout=5))["error"]["code"] == "bad_json"
    await ws.send_raw('{"op":"ping","pad":"' + "x" * 70000 + '"}')
    assert (await ws.next_event("error", timeout=5))["error"]["code"] == "frame_too_large"
    await asyncio.wait_for(ws.closed.wait(), 5)


async def test_rate_limited_requests_are_refused_and_not_carried_out(
        start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("--rate-limit", "20")  # 20 a second, bursts up to 40
    async with Chat(node) as chat:
        c = await chat.connect()
        futures = [c.expect_reply(i) for i in range(100)]
        await c.send_raw(b"".join(b'{"op":"ping","rid":%d}\n' % i for i in range(100)))
        replies = await asyncio.gather(*futures)
        ok = [r for r in replies if r["ok"]]
        assert 40 <= len(ok) <= 45, len(ok)
        assert replies[0]["ok"] and not replies[-1]["ok"]
        assert all(r["error"]["code"] == "rate_limited" for r in replies if not r["ok"])

        # A refused request is not carried out: the registration created nobody.
        fresh = await chat.connect()  # limits are per connection: a full bucket
        futures = [fresh.expect_reply(i) for i in range(61)]
        frames = [b'{"op":"ping","rid":%d}\n' % i for i in range(60)]
        frames.append(b'{"op":"register","rid":60,"name":"carol","password":"%s"}\n' % PASSWORD.encode())
        await fresh.send_raw(b"".join(frames))
        replies = await asyncio.gather(*futures)
        assert_error(replies[60], "rate_limited")
        await asyncio.sleep(0.2)
        assert (await fresh.call("register", name="carol", password=PASSWORD))["ok"] is True


async def test_duplicate_login_reject_refuses_the_second_login(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("--rate-limit", "0", "--duplicate-login", "reject")
    async with Chat(node) as chat:
        alice = await chat.user("alice")
        bob = await chat.user("bob")
        await make_friends(alice, bob)
        second = await chat.connect()
        assert_error(await second.request("login", name="alice", password=PASSWORD), "already_logged_in")
        assert_error(await second.request("login", token=alice.login["token"]), "already_logged_in")
        # The first session is untouched: not kicked, still online, still working.
        assert await quiet(alice.client) == []
        assert await quiet(bob.client) == []
        assert (await bob.call("friends"))["friends"] == [{"id": alice.id, "name": "alice", "online": True}]
        await bob.call("send", to=alice.id, text="still there?")
        assert (await alice.event("message"))["text"] == "still there?"
        # Once alice logs out, the second connection may log in.
        await alice.call("logout")
        assert (await second.call("login", name="alice", password=PASSWORD))["user"]["id"] == alice.id


async def test_kick_closes_the_older_session_without_a_presence_flicker(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    again = await chat.login("alice", websocket=True)
    assert (await alice.event("kicked"))["reason"] == "logged_in_elsewhere"
    await asyncio.wait_for(alice.client.closed.wait(), 5)
    # Bob never sees alice go offline; she is still online on the new connection.
    events = await quiet(bob.client)
    assert all(not (e["event"] == "presence" and e["online"] is False) for e in events), events
    assert (await bob.call("friends"))["friends"] == [{"id": alice.id, "name": "alice", "online": True}]
    await bob.call("send", to=alice.id, text="hello again")
    assert (await again.event("message"))["text"] == "hello again"
    # Her token from the first login still works (only logout revokes it).
    third = await chat.connect()
    assert (await third.call("login", token=alice.login["token"]))["user"]["id"] == alice.id
