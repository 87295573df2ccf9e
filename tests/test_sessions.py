"""One session per user, presence, idle timeout and rate limit (PROTOCOL.md sections 3, 5, 6).

All of this lives in the node's memory, so one database (SQLite) is enough.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from clusterchat.client import ConnectionClosed, ReplyError
from support.lifecycle_helpers import (
    PASSWORD,
    Raw,
    RawWs,
    User,
    abort_client,
    assert_serving,
    befriend,
    close_all,
    connect,
    drain_events,
    frame,
    login,
    new_user,
    wait_closed,
)
from support.node import NodeProcess

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)

StartNode = Callable[..., NodeProcess]


def presence_of(events: list[dict[str, Any]], user_id: int) -> list[bool]:
    return [e["online"] for e in events if e.get("event") == "presence" and e["user_id"] == user_id]


async def friend_online(user: User, friend_id: int) -> bool:
    friends = (await user.call("friends"))["friends"]
    (entry,) = [f for f in friends if f["id"] == friend_id]
    online: bool = entry["online"]
    return online


# --------------------------------------------------------------------------- duplicate login: kick


@pytest.mark.parametrize(
    ("old_ws", "new_ws", "by_token"),
    [(False, False, False), (False, True, False), (True, False, True), (True, True, True)],
    ids=["tcp-tcp", "tcp-ws", "ws-tcp-token", "ws-ws-token"],
)
async def test_second_login_kicks_the_first_session(node: NodeProcess, old_ws: bool, new_ws: bool,
                                                    by_token: bool) -> None:
    carol = await new_user(node, "carol")
    old = await new_user(node, "alice", websocket=old_ws)
    await befriend(old, carol)
    drain_events(carol.client)

    new = await login(node, old.name, websocket=new_ws, token=old.login["token"] if by_token else None)
    assert new.id == old.id

    kicked = await old.client.next_event("kicked", timeout=5)
    assert kicked == {"event": "kicked", "reason": "logged_in_elsewhere"}
    await wait_closed(old.client, 5)
    with pytest.raises(ConnectionClosed):
        await old.client.request("ping")

    # The new session is a full session: it sees carol online and chats both ways.
    assert new.login["friends"] == [{"id": carol.id, "name": carol.name, "online": True}]
    sent = await carol.call("send", to=new.id, text="to the new session")
    ev = await new.client.next_event("message")
    assert ev["id"] == sent["id"] and ev["text"] == "to the new session"
    sent = await new.call("send", to=carol.id, text="from the new session")
    ev = await carol.client.next_event("message")
    assert ev["id"] == sent["id"] and ev["from"] == {"id": new.id, "name": new.name}

    # Carol never lost alice: no offline presence, and alice is online for her.
    await asyncio.sleep(0.2)
    assert False not in presence_of(drain_events(carol.client), new.id)
    assert await friend_online(carol, new.id)
    await close_all([carol, new])


async def test_kicked_session_gets_nothing_more(node: NodeProcess) -> None:
    """After the kick, messages for the user reach only the new session."""
    bob = await new_user(node, "bob")
    old = await new_user(node, "alice")
    await befriend(old, bob)
    new = await login(node, old.name, websocket=True)
    await wait_closed(old.client, 5)
    texts = [f"m{i}" for i in range(5)]
    for text in texts:
        await bob.call("send", to=new.id, text=text)
    got = [(await new.client.next_event("message"))["text"] for _ in texts]
    assert got == texts
    leftover = [e for e in drain_events(old.client) if e.get("event") == "message"]
    assert leftover == []
    await close_all([bob, new])


async def test_login_twice_on_one_connection_is_refused(node: NodeProcess) -> None:
    alice = await new_user(node, "alice")
    with pytest.raises(ReplyError) as err:
        await alice.call("login", name=alice.name, password=PASSWORD)
    assert err.value.code == "already_logged_in"
    assert not alice.client.closed.is_set()
    assert "user" in await alice.call("lookup", name=alice.name)
    await alice.client.close()


# --------------------------------------------------------------------------- duplicate login: reject


async def test_duplicate_login_reject_keeps_the_first_session(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--duplicate-login", "reject")
    carol = await new_user(node, "carol")
    first = await new_user(node, "alice")
    await befriend(first, carol)
    drain_events(carol.client)

    second = await connect(node, websocket=True)
    for creds in ({"name": first.name, "password": PASSWORD}, {"token": first.login["token"]}):
        with pytest.raises(ReplyError) as err:
            await second.call("login", **creds)
        assert err.value.code == "already_logged_in"
    # The refused connection stays open, logged out.
    with pytest.raises(ReplyError) as err:
        await second.call("friends")
    assert err.value.code == "not_logged_in"
    assert not second.closed.is_set()

    # The first session was not disturbed.
    assert not first.client.closed.is_set()
    assert [e for e in drain_events(first.client) if e.get("event") == "kicked"] == []
    sent = await first.call("send", to=carol.id, text="still here")
    ev = await carol.client.next_event("message")
    assert ev["id"] == sent["id"] and ev["from"]["id"] == first.id
    sent = await carol.call("send", to=first.id, text="good")
    assert (await first.client.next_event("message"))["id"] == sent["id"]
    assert presence_of(drain_events(carol.client), first.id) == []

    # Once the first connection is gone, the user can log in again.
    abort_client(first.client)
    assert (await carol.client.next_event("presence", timeout=5)) == {
        "event": "presence", "user_id": first.id, "online": False}
    reply = await second.call("login", name=first.name, password=PASSWORD)
    assert reply["user"]["id"] == first.id
    assert (await carol.client.next_event("presence", timeout=5))["online"] is True
    await close_all([carol.client, second])


async def test_concurrent_logins_of_one_user_leave_exactly_one_session(node: NodeProcess) -> None:
    carol = await new_user(node, "carol")
    alice = await new_user(node, "alice")
    await befriend(alice, carol)
    await alice.client.close()
    await carol.client.next_event("presence", timeout=5)

    clients = [await connect(node, websocket=i % 2 == 1) for i in range(6)]
    replies = await asyncio.gather(*(c.request("login", name=alice.name, password=PASSWORD) for c in clients),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionClosed) or (isinstance(r, dict) and r["ok"]) for r in replies), replies
    await asyncio.sleep(0.3)
    alive = [c for c in clients if not c.closed.is_set()]
    assert len(alive) == 1
    (survivor,) = alive
    assert (await survivor.call("friends"))["friends"] == [{"id": carol.id, "name": carol.name, "online": True}]
    for c in clients:
        if c is not survivor:
            assert [e["event"] for e in drain_events(c) if e["event"] == "kicked"] == ["kicked"]
    assert await friend_online(carol, alice.id)
    seen = presence_of(drain_events(carol.client), alice.id)
    assert seen and False not in seen, seen  # online, with no flicker while the logins kicked each other
    await close_all([carol.client, *clients])


async def test_concurrent_logins_with_reject_admit_exactly_one(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--duplicate-login", "reject")
    alice = await new_user(node, "alice")
    await alice.call("logout")
    clients = [await connect(node, websocket=i % 2 == 1) for i in range(6)]
    replies = await asyncio.gather(*(c.request("login", name=alice.name, password=PASSWORD) for c in clients))
    assert sorted("ok" if r["ok"] else r["error"]["code"] for r in replies) == ["already_logged_in"] * 5 + ["ok"]
    assert not any(c.closed.is_set() for c in clients)
    (winner,) = [c for c, r in zip(clients, replies, strict=True) if r["ok"]]
    assert "groups" in await winner.call("groups")
    await close_all([alice.client, *clients])


# --------------------------------------------------------------------------- presence


@pytest.mark.parametrize("bob_ws", [False, True], ids=["tcp", "ws"])
async def test_abrupt_disconnect_shows_offline_and_messages_wait(node: NodeProcess, bob_ws: bool) -> None:
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob", websocket=bob_ws)
    await befriend(alice, bob)
    assert await friend_online(alice, bob.id)

    abort_client(bob.client)
    ev = await alice.client.next_event("presence", timeout=5)
    assert ev == {"event": "presence", "user_id": bob.id, "online": False}
    assert not await friend_online(alice, bob.id)

    sent = await alice.call("send", to=bob.id, text="while you were away")
    back = await login(node, bob.name, websocket=bob_ws)
    assert [m["id"] for m in back.login["offline"]] == [sent["id"]]
    assert back.login["friends"] == [{"id": alice.id, "name": alice.name, "online": True}]
    assert (await alice.client.next_event("presence", timeout=5))["online"] is True
    await close_all([alice, back])


async def test_logout_shows_offline_keeps_connection_and_revokes_token(node: NodeProcess) -> None:
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob", websocket=True)
    await befriend(alice, bob)
    token = bob.login["token"]

    reply = await bob.call("logout")
    assert reply["ok"] is True and set(reply) <= {"op", "rid", "ok"}
    ev = await alice.client.next_event("presence", timeout=5)
    assert ev == {"event": "presence", "user_id": bob.id, "online": False}
    assert not await friend_online(alice, bob.id)

    # The connection stays open, logged out.
    assert not bob.client.closed.is_set()
    assert "ts" in await bob.call("ping")
    for op, fields in (("friends", {}), ("send", {"to": alice.id, "text": "x"})):
        with pytest.raises(ReplyError) as err:
            await bob.call(op, **fields)
        assert err.value.code == "not_logged_in"
    with pytest.raises(ReplyError) as err:
        await bob.call("login", token=token)
    assert err.value.code == "bad_credentials"

    # Logging in again on the same connection brings bob back for alice.
    await bob.call("login", name=bob.name, password=PASSWORD)
    ev = await alice.client.next_event("presence", timeout=5)
    assert ev == {"event": "presence", "user_id": bob.id, "online": True}
    assert await friend_online(alice, bob.id)
    await close_all([alice, bob])


async def test_presence_only_goes_to_friends(node: NodeProcess) -> None:
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob")
    stranger = await new_user(node, "eve")
    await befriend(alice, bob)
    await bob.client.close()
    await alice.client.next_event("presence", timeout=5)
    await asyncio.sleep(0.2)
    assert presence_of(drain_events(stranger.client), bob.id) == []
    await close_all([alice, stranger])


# --------------------------------------------------------------------------- idle timeout


async def test_idle_connections_are_closed(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--idle-timeout", "1")
    start = time.monotonic()
    tcp = await Raw.connect(node)
    ws = await RawWs.connect(node)
    tcp_frames, ws_frames = await asyncio.gather(tcp.read_until_closed(4), ws.read_until_closed(4))
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed <= 3.0, elapsed
    assert [f for f in tcp_frames + ws_frames if "ok" in f] == []
    await assert_serving(node)


async def test_active_connection_stays_and_sees_idle_friend_go(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--idle-timeout", "1")
    alice = await new_user(node, "alice", websocket=True)
    bob = await new_user(node, "bob")
    await befriend(alice, bob)  # bob's last frame; from now on he is silent

    start = time.monotonic()
    bob_closed_at: float | None = None
    while time.monotonic() - start < 3.0:
        assert "ts" in await alice.call("ping")
        if bob_closed_at is None and bob.client.closed.is_set():
            bob_closed_at = time.monotonic() - start
        await asyncio.sleep(0.3)
    assert not alice.client.closed.is_set()
    assert bob_closed_at is not None and bob_closed_at <= 2.5, bob_closed_at
    assert presence_of(drain_events(alice.client), bob.id) == [False]
    await alice.client.close()


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_burst_gets_one_reply_each_in_order(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "5")  # 5 a second, bursts of 10
    raw = await Raw.connect(node)
    await raw.send(b"".join(frame(op="ping", rid=i) for i in range(30)))
    replies = [await raw.read(5) for _ in range(30)]
    assert [r["rid"] for r in replies] == list(range(30))
    assert all(r["op"] == "ping" for r in replies)
    ok = [r["ok"] for r in replies]
    codes = [r["error"]["code"] for r in replies if not r["ok"]]
    assert set(codes) == {"rate_limited"}
    assert ok[:10] == [True] * 10  # the burst allowance
    assert 10 <= ok.count(True) <= 12 and ok.count(False) >= 18
    assert await raw.quiet(0.2) == []  # exactly one reply each

    await asyncio.sleep(1.0)  # 5 tokens back
    for i in range(4):
        reply = await raw.request(op="ping", rid=f"later{i}")
        assert reply["ok"] is True, reply
    await raw.close()


async def test_rate_limited_sends_are_not_carried_out(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "5")
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob")
    await befriend(alice, bob)
    await asyncio.sleep(1.5)  # refill alice's bucket

    futures = [alice.client.expect_reply(f"s{i}") for i in range(30)]
    await alice.client.send_raw(b"".join(frame(op="send", rid=f"s{i}", to=bob.id, text=f"burst {i}")
                                         for i in range(30)))
    replies = [await asyncio.wait_for(f, 10) for f in futures]
    accepted = [(i, r["id"]) for i, r in enumerate(replies) if r["ok"]]
    refused = [r for r in replies if not r["ok"]]
    assert refused and all(r["error"]["code"] == "rate_limited" for r in refused)
    assert 10 <= len(accepted) <= 12

    await asyncio.sleep(1.0)
    sentinel = await alice.call("send", to=bob.id, text="sentinel")
    got: list[dict[str, Any]] = []
    while not got or got[-1]["id"] != sentinel["id"]:
        got.append(await bob.client.next_event("message", timeout=5))
    # Bob got exactly the accepted sends, in order; the refused ones never happened.
    assert [(int(m["text"].split()[1]), m["id"]) for m in got[:-1]] == accepted
    history = await bob.call("history", **{"with": alice.id, "limit": 100})
    assert [m["id"] for m in history["messages"]] == [mid for _, mid in accepted] + [sentinel["id"]]
    await close_all([alice, bob])


async def test_rate_limit_zero_limits_nothing(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    await raw.send(b"".join(frame(op="ping", rid=i) for i in range(300)))
    replies = [await raw.read(5) for _ in range(300)]
    assert [r["rid"] for r in replies] == list(range(300))
    assert all(r["ok"] for r in replies)
    await raw.close()
