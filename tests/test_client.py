"""The high-level client library (`clusterchat.client.Client`, the contract in the client API notes)
against real nodes: typed helpers, the events iterator, automatic acks, deduplication,
reconnection across dropped connections and node restarts, kicks, and a clean close.

Most tests run on SQLite only; the SIGKILL-and-restart stream runs on every database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from clusterchat.client import ChatClient, Client, ConnectionClosed, ReplyError
from support.node import NodeProcess

StartNode = Callable[..., NodeProcess]
Event = dict[str, Any]

PASSWORD = "secret123"
SQLITE_ONLY = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)


# --------------------------------------------------------------------------- helpers


def new_client(node: NodeProcess, *, websocket: bool = False, **options: Any) -> Client:
    options.setdefault("backoff", (0.1, 0.5))
    return Client(node.host, node.ws_port if websocket else node.port, websocket=websocket, **options)


async def user(node: NodeProcess, name: str, *, websocket: bool = False, **options: Any) -> Client:
    """A connected client, registered and logged in as `name`."""
    client = new_client(node, websocket=websocket, **options)
    await client.connect()
    await client.register(name, PASSWORD)
    await client.login(name, PASSWORD)
    return client


def uid(client: Client) -> int:
    assert client.user is not None
    user_id: int = client.user["id"]
    return user_id


async def befriend(a: Client, b: Client) -> None:
    await a.friend_request(uid(b))
    await b.friend_accept(uid(a))


async def eventually(predicate: Callable[[], bool], within: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Collector:
    """Everything `async for event in client` yields, collected by a task."""

    def __init__(self, client: Client) -> None:
        self.events: list[Event] = []
        self.task = asyncio.create_task(self._run(client))

    async def _run(self, client: Client) -> None:
        async for event in client:
            self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def texts(self) -> list[str]:
        return [m["text"] for m in self.of("message")]

    async def wait(self, kind: str, count: int, within: float = 15) -> list[Event]:
        await eventually(lambda: len(self.of(kind)) >= count, within, f"{count} {kind} events (have {self.kinds})")
        return self.of(kind)

    async def ended(self, within: float = 5) -> None:
        await asyncio.wait_for(asyncio.shield(self.task), within)


async def raw_login(node: NodeProcess, name: str) -> tuple[ChatClient, dict[str, Any]]:
    """A low-level connection logged in as `name` (which kicks the user's other session)."""
    raw = await ChatClient.connect(node.host, node.port)
    reply = await raw.call("login", name=name, password=PASSWORD)
    return raw, reply


# --------------------------------------------------------------------------- requests


@SQLITE_ONLY
@pytest.mark.parametrize("websocket", [False, True], ids=["tcp", "ws"])
async def test_typed_helpers_return_reply_fields_and_raise_reply_error(node: NodeProcess, websocket: bool) -> None:
    alice = new_client(node, websocket=websocket)
    await alice.connect()
    assert alice.connected and alice.user is None and alice.token is None
    registered = await alice.register("alice", PASSWORD)
    assert set(registered) == {"user_id"} and isinstance(registered["user_id"], int)
    with pytest.raises(ReplyError) as taken:
        await alice.register("alice", PASSWORD)
    assert taken.value.code == "name_taken" and taken.value.message and taken.value.reply["ok"] is False
    with pytest.raises(ReplyError) as bad:
        await alice.login("alice", "wrong-password")
    assert bad.value.code == "bad_credentials"
    with pytest.raises(ReplyError) as anonymous:
        await alice.friends()
    assert anonymous.value.code == "not_logged_in"

    login = await alice.login("alice", PASSWORD)
    assert not {"ok", "rid", "op"} & set(login)
    assert login["user"] == {"id": registered["user_id"], "name": "alice"} == alice.user
    assert login["token"] == alice.token and login["offline"] == [] and login["more"] is False
    assert isinstance((await alice.ping())["ts"], int)

    bob = await user(node, "bob")
    assert await alice.lookup("bob") == {"user": {"id": uid(bob), "name": "bob"}}
    with pytest.raises(ReplyError) as nobody:
        await alice.lookup("nobody")
    assert nobody.value.code == "no_such_user"
    with pytest.raises(ReplyError) as stranger:
        await alice.send(uid(bob), "hi")
    assert stranger.value.code == "not_friends"
    raw = await alice.request("send", to=uid(bob), text="hi")  # the raw form raises nothing
    assert raw["ok"] is False and raw["error"]["code"] == "not_friends" and raw["op"] == "send" and "rid" in raw

    assert await alice.friend_request(uid(bob), note="hello") == {}
    accepted = await bob.friend_accept(uid(alice))
    assert accepted == {"friend": {"id": uid(alice), "name": "alice", "online": True}}
    assert (await alice.friends())["friends"] == [{"id": uid(bob), "name": "bob", "online": True}]

    sent = await alice.send(uid(bob), "hi bob")
    assert set(sent) == {"id", "ts"}
    again = await alice.send(uid(bob), "once", cmid="fixed-cmid")
    assert await alice.send(uid(bob), "once", cmid="fixed-cmid") == again  # the same cmid is stored once
    history = (await bob.history(with_=uid(alice)))["messages"]
    assert [(m["id"], m["text"]) for m in history] == [(sent["id"], "hi bob"), (again["id"], "once")]

    group = (await alice.create_group("team", desc="the team"))["group"]
    assert group["name"] == "team" and group["role"] == "creator"
    assert (await bob.join_group(group["id"]))["group"]["id"] == group["id"]
    assert [g["id"] for g in (await bob.groups())["groups"]] == [group["id"]]
    group_sent = await alice.group_send(group["id"], "hi team")
    assert [m["id"] for m in (await bob.history(group_id=group["id"]))["messages"]] == [group_sent["id"]]
    synced = await bob.sync(after=0)
    assert [m["id"] for m in synced["messages"]] == [sent["id"], again["id"], group_sent["id"]]
    assert synced["more"] is False
    assert (await bob.sync(after=0, limit=1))["more"] is True
    assert await bob.ack(synced["messages"][-1]["seq"]) == {}
    with pytest.raises(ReplyError) as no_group:
        await bob.join_group(987654)
    assert no_group.value.code == "no_such_group"
    assert await bob.leave_group(group["id"]) == {}

    room = (await alice.create_room("lobby"))["room"]
    assert room["name"] == "lobby" and room["port"] == node.port
    joined = (await bob.join_room(room["id"]))["room"]
    assert {"id": uid(bob), "name": "bob"} in joined["members"]
    assert isinstance((await bob.room_send(room["id"], "hello room"))["ts"], int)
    assert await bob.leave_room(room["id"]) == {}
    with pytest.raises(ReplyError) as no_room:
        await bob.room_send(room["id"], "gone")
    assert no_room.value.code in ("no_such_room", "not_member")

    assert await alice.unfriend(uid(bob)) == {}
    with pytest.raises(ReplyError) as unfriended:
        await alice.send(uid(bob), "still there?")
    assert unfriended.value.code == "not_friends"
    assert await bob.friend_reject(uid(alice)) == {}  # nothing to reject succeeds

    token = alice.token
    assert await alice.logout() == {}
    assert alice.user is None and alice.token is None and alice.connected
    with pytest.raises(ReplyError) as revoked:
        await alice.login(token=token)
    assert revoked.value.code == "bad_credentials"
    await alice.close()
    await bob.close()
    with pytest.raises(ConnectionClosed):
        await alice.ping()


# --------------------------------------------------------------------------- events


@SQLITE_ONLY
async def test_offline_messages_come_first_in_order_then_live_ones_once(node: NodeProcess) -> None:
    alice = await user(node, "alice")
    bob = await user(node, "bob", websocket=True)
    await befriend(alice, bob)
    bob_id = uid(bob)
    await bob.close()
    offline_ids = [(await alice.send(bob_id, f"offline {i}"))["id"] for i in range(5)]

    bob = new_client(node, websocket=True)
    await bob.connect()
    login = await bob.login("bob", PASSWORD)
    assert [m["id"] for m in login["offline"]] == offline_ids
    events = Collector(bob)
    await events.wait("message", 5)
    live_ids = [(await alice.send(uid(bob), f"live {i}"))["id"] for i in range(3)]
    await events.wait("message", 8)
    await bob.ping()
    await asyncio.sleep(0.2)

    messages = events.of("message")
    assert [m["id"] for m in messages] == offline_ids + live_ids
    assert [m["text"] for m in messages] == [f"offline {i}" for i in range(5)] + [f"live {i}" for i in range(3)]
    assert [m["seq"] for m in messages] == sorted({m["seq"] for m in messages})
    assert messages[0]["from"] == {"id": uid(alice), "name": "alice"} and messages[0]["to"] == uid(bob)
    await alice.close()
    await bob.close()
    await events.ended()


@SQLITE_ONLY
async def test_messages_delivered_again_after_a_drop_are_yielded_once(node: NodeProcess) -> None:
    alice = await user(node, "alice")
    bob = await user(node, "bob", ack_delay=30, ack_every=1000)  # nothing is acked before the drop
    await befriend(alice, bob)
    events = Collector(bob)
    first = [(await alice.send(uid(bob), f"before {i}"))["id"] for i in range(3)]
    await events.wait("message", 3)
    assert bob.acked_seq == 0  # so the node sends all three again at the next login

    assert bob._conn is not None
    bob._conn.abort()  # the connection drops under the client's feet
    await events.wait("reconnected", 1)
    after = [(await alice.send(uid(bob), f"after {i}"))["id"] for i in range(2)]
    await events.wait("message", 5)
    await bob.ping()
    await asyncio.sleep(0.2)

    assert [m["id"] for m in events.of("message")] == first + after
    assert events.kinds[events.kinds.index("disconnected") + 1] == "reconnected"
    await bob.close()  # acknowledges everything handed out
    raw, login = await raw_login(node, "bob")
    assert login["offline"] == []
    await raw.close()
    await alice.close()


@SQLITE_ONLY
async def test_acks_are_batched_and_only_for_messages_handed_out(node: NodeProcess) -> None:
    alice = await user(node, "alice")
    bob = await user(node, "bob", ack_delay=30, ack_every=3)
    carol = await user(node, "carol", ack_delay=0.05, ack_every=1000)
    dave = await user(node, "dave")  # never iterates its events
    for friend in (bob, carol, dave):
        await befriend(alice, friend)

    bob_events = Collector(bob)
    carol_events = Collector(carol)
    sent = [await alice.send(uid(bob), f"to bob {i}") for i in range(4)]
    for i in range(2):
        await alice.send(uid(carol), f"to carol {i}")
        await alice.send(uid(dave), f"to dave {i}")

    # ack_every: the third message handed out triggers an ack; the fourth waits for ack_delay.
    await bob_events.wait("message", 4)
    await eventually(lambda: bob.acked_seq == 3, 5, "bob's batched ack")
    await asyncio.sleep(0.3)
    assert bob.acked_seq == 3
    raw_bob, login = await raw_login(node, "bob")  # kicks bob: his acks must already be stored
    assert [m["id"] for m in login["offline"]] == [sent[3]["id"]]

    # ack_delay: carol's two messages are acked 50 ms after she got them.
    await carol_events.wait("message", 2)
    await eventually(lambda: carol.acked_seq == 2, 5, "carol's delayed ack")
    raw_carol, login = await raw_login(node, "carol")
    assert login["offline"] == []

    # dave never took his messages from the iterator: nothing was acknowledged, even by close().
    await dave.ping()
    await dave.close()
    raw_dave, login = await raw_login(node, "dave")
    assert [m["text"] for m in login["offline"]] == ["to dave 0", "to dave 1"]

    for raw in (raw_bob, raw_carol, raw_dave):
        await raw.close()
    for client in (alice, bob, carol):
        await client.close()


@SQLITE_ONLY
async def test_kicked_ends_the_events_and_does_not_reconnect(node: NodeProcess) -> None:
    bob = await user(node, "bob", backoff=(0.05, 0.1))
    events = Collector(bob)
    raw, _ = await raw_login(node, "bob")
    await events.ended()
    assert events.kinds == ["kicked"] and events.events[0]["reason"] == "logged_in_elsewhere"
    assert not bob.connected and bob.user is None and bob.token is None
    with pytest.raises(ConnectionClosed):
        await bob.ping()
    await asyncio.sleep(0.5)  # ten backoffs: a reconnection would have kicked the new session
    await raw.call("ping")
    assert not raw.closed.is_set() and raw.events.empty()
    assert [e async for e in bob.events()] == []  # a new iterator ends at once too
    await bob.close()
    await raw.close()


# --------------------------------------------------------------------------- reconnection


@SQLITE_ONLY
@pytest.mark.parametrize("websocket", [False, True], ids=["tcp", "ws"])
async def test_reconnects_after_a_node_restart_and_resends_what_may_be_resent(
        node: NodeProcess, websocket: bool) -> None:
    alice = await user(node, "alice")
    bob = await user(node, "bob", websocket=websocket)
    await befriend(alice, bob)
    bob_events = Collector(bob)
    alice_events = Collector(alice)
    before = await alice.send(uid(bob), "before")
    await bob_events.wait("message", 1)

    assert await asyncio.to_thread(node.terminate) == 0
    await bob_events.wait("disconnected", 1)
    await alice_events.wait("disconnected", 1)
    assert not alice.connected and not bob.connected
    with pytest.raises(ConnectionClosed):  # not safe to repeat: fails at once
        await alice.friend_request(uid(bob))
    meanwhile = [asyncio.create_task(alice.send(uid(bob), f"meanwhile {i}")) for i in range(3)]
    pinged = asyncio.create_task(bob.ping())  # read-only: waits for the reconnection
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in [*meanwhile, pinged])

    await asyncio.to_thread(node.start)
    sent = [await t for t in meanwhile]
    assert isinstance((await pinged)["ts"], int)
    await alice_events.wait("reconnected", 1)
    await bob_events.wait("reconnected", 1)
    assert alice.connected and bob.connected
    after = await alice.send(uid(bob), "after")
    await bob_events.wait("message", 5)
    await bob.ping()
    await asyncio.sleep(0.2)

    assert [m["id"] for m in bob_events.of("message")] == [before["id"], *(s["id"] for s in sent), after["id"]]
    assert bob_events.texts() == ["before", "meanwhile 0", "meanwhile 1", "meanwhile 2", "after"]
    kinds = [k for k in bob_events.kinds if k in ("message", "disconnected", "reconnected")]
    assert kinds == ["message", "disconnected", "reconnected", "message", "message", "message", "message"]
    await alice.close()
    await bob.close()


N = 150
CHUNK = 10


async def test_sigkill_during_a_stream_loses_and_repeats_nothing(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice = await user(node, "alice", timeout=60)
    bob = await user(node, "bob", ack_every=20)
    await befriend(alice, bob)
    bob_events = Collector(bob)
    alice_events = Collector(alice)

    results: list[dict[str, Any]] = []
    restart: asyncio.Task[NodeProcess] | None = None
    for start in range(0, N, CHUNK):
        # Ten pipelined sends; in the middle of the stream the node dies under them.
        chunk = [asyncio.create_task(alice.send(uid(bob), f"message {i}")) for i in range(start, start + CHUNK)]
        if start == N // 3:
            await asyncio.sleep(0.003)
            node.kill()
            restart = asyncio.create_task(asyncio.to_thread(node.start))
        results.extend(await asyncio.gather(*chunk))
    assert restart is not None
    await restart

    assert len({r["id"] for r in results}) == N
    messages = await bob_events.wait("message", N, within=60)
    await bob.ping()
    await asyncio.sleep(0.3)
    messages = bob_events.of("message")
    assert [m["id"] for m in messages] == [r["id"] for r in results], "lost, repeated or reordered messages"
    assert bob_events.texts() == [f"message {i}" for i in range(N)]
    assert "reconnected" in bob_events.kinds and "reconnected" in alice_events.kinds
    await bob.close()
    raw, login = await raw_login(node, "bob")
    assert login["offline"] == []  # and every one of them was acknowledged
    await raw.close()
    await alice.close()


# --------------------------------------------------------------------------- closing


@SQLITE_ONLY
async def test_close_leaves_no_task_behind(node: NodeProcess) -> None:
    before = asyncio.all_tasks()
    alice = await user(node, "alice")
    bob = await user(node, "bob", websocket=True)
    await befriend(alice, bob)
    collectors = [Collector(alice), Collector(bob)]
    await alice.send(uid(bob), "hi")
    await collectors[1].wait("message", 1)

    def leftovers() -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - before - {c.task for c in collectors}

    assert leftovers()  # the clients do run tasks while open
    await alice.close()  # while connected
    await collectors[0].ended()
    await asyncio.to_thread(node.terminate)
    await collectors[1].wait("disconnected", 1)
    started = time.monotonic()
    await bob.close()  # while reconnecting to a node that is gone
    assert time.monotonic() - started < 2
    await collectors[1].ended()
    assert leftovers() == set()
    await alice.close()  # closing twice is harmless
    with pytest.raises(ConnectionClosed):
        await bob.send(uid(alice), "too late")
    with pytest.raises(ConnectionClosed):
        await bob.connect()


# --------------------------------------------------------------------------- catching up


@SQLITE_ONLY
async def test_an_inbox_longer_than_a_login_page_is_caught_up_with_sync(node: NodeProcess) -> None:
    alice = await user(node, "alice")
    bob = await user(node, "bob")
    await befriend(alice, bob)
    bob_id = uid(bob)
    await bob.close()
    total = 640  # the login reply holds 500; the rest comes by `sync` pages
    ids: list[int] = []
    for start in range(0, total, 40):
        replies = await asyncio.gather(*(alice.send(bob_id, f"offline {i}") for i in range(start, start + 40)))
        ids.extend(r["id"] for r in replies)

    bob = new_client(node, ack_every=100)
    await bob.connect()
    login = await bob.login("bob", PASSWORD)
    assert len(login["offline"]) == 500 and login["more"] is True
    events = Collector(bob)
    live = asyncio.create_task(alice.send(bob_id, "live"))  # while bob is catching up
    await events.wait("message", total + 1, within=30)
    await bob.ping()
    await asyncio.sleep(0.2)
    assert [m["id"] for m in events.of("message")] == [*ids, (await live)["id"]]
    await eventually(lambda: bob.acked_seq == total + 1, 5, "the acks of the whole inbox")
    await bob.close()
    await alice.close()


class FakeConnection:
    """Stands in for a connection in the socket-free test: records what the client writes."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.written: list[dict[str, Any]] = []

    async def send_frames(self, frames: list[bytes]) -> None:
        import json

        self.written.extend(json.loads(f) for f in frames)

    def abort(self) -> None:
        self.closed.set()

    async def close(self) -> None:
        self.closed.set()


def message(seq: int, text: str = "") -> dict[str, Any]:
    return {"event": "message", "seq": seq, "id": 1000 + seq, "from": {"id": 2, "name": "bob"}, "to": 1,
            "text": text or f"m{seq}", "ts": 0}


async def test_catch_up_holds_live_messages_and_drops_duplicates_without_a_node() -> None:
    client = Client("127.0.0.1", 1, ping_interval=None)
    conn = FakeConnection()
    client._conn = conn  # type: ignore[assignment]
    client._state = client._state.OPEN
    events = client.events()

    login = asyncio.create_task(client.login("alice", PASSWORD))
    await eventually(lambda: len(conn.written) == 1, 2, "the login request")
    rid = conn.written[0]["rid"]
    client._on_frame(conn, {"op": "login", "rid": rid, "ok": True, "user": {"id": 1, "name": "alice"},  # type: ignore[arg-type]
                            "token": "t", "friends": [], "groups": [], "friend_requests": [],
                            "offline": [message(1), message(2)], "more": True})
    # A live message overtaking the catch-up, and one already in `offline`, arrive before any sync reply.
    client._on_frame(conn, message(5, "live"))  # type: ignore[arg-type]
    client._on_frame(conn, message(2))  # type: ignore[arg-type]
    await login
    assert [(await anext(events))["seq"] for _ in range(2)] == [1, 2]
    await eventually(lambda: len(conn.written) == 2, 2, "the catch-up sync")
    sync = conn.written[1]
    assert sync["op"] == "sync" and sync["after"] == 2
    client._on_frame(conn, {"op": "sync", "rid": sync["rid"], "ok": True,  # type: ignore[arg-type]
                            "messages": [message(2), message(3), message(4)], "more": False})
    assert [(await anext(events))["text"] for _ in range(3)] == ["m3", "m4", "live"]
    with pytest.raises(TimeoutError):  # nothing else, and the iterator survives the cancelled wait
        await asyncio.wait_for(anext(events), 0.05)
    client._on_frame(conn, message(6))  # type: ignore[arg-type]
    assert (await anext(events))["seq"] == 6
    await client.close()


@SQLITE_ONLY
async def test_without_reconnect_a_lost_connection_ends_the_events(node: NodeProcess) -> None:
    bob = await user(node, "bob", reconnect=False)
    events = Collector(bob)
    token = bob.token
    await asyncio.to_thread(node.terminate)
    await events.ended()
    assert events.kinds == ["disconnected"] and not bob.connected and bob.user is None
    with pytest.raises(ConnectionClosed):
        await bob.ping()  # even a read-only request: nobody will reconnect
    await asyncio.to_thread(node.start)
    await bob.connect()  # by hand, with the token kept for it
    assert (await bob.login(token=token))["user"]["name"] == "bob" and bob.connected
    await bob.close()
