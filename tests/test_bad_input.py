"""Hostile and broken clients (PROTOCOL.md sections 1-3): the node answers what it can, closes
what it must, and keeps serving everyone else.

Parsing and buffering do not touch the database, so SQLite is enough, and most tests share one
node per module (a node that crashed on one would fail the next ones' liveness checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from clusterchat.client import ChatClient
from support.lifecycle_helpers import (
    PASSWORD,
    BareSocket,
    Raw,
    RawWs,
    assert_alive,
    assert_serving,
    befriend,
    close_all,
    drain_events,
    fetch_inbox,
    frame,
    login,
    new_user,
    node_rss,
    unique_name,
)
from support.node import NodeProcess

StartNode = Callable[..., NodeProcess]
MB = 1 << 20


def _module_node(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp(name)
    node = NodeProcess(f"sqlite:///{workdir / 'chat.db'}", workdir, "--rate-limit", "0", *flags).start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node (SQLite, default limits) shared by this module's tests: they all start with a
    fresh connection and unique user names, and each checks the node is still alive."""
    yield from _module_node(tmp_path_factory, "shared_node")


@pytest.fixture(scope="module")
def small_frame_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A shared node with `--max-frame 1024`."""
    yield from _module_node(tmp_path_factory, "small_frame_node", "--max-frame", "1024")


def assert_error_event(msg: dict[str, Any], code: str) -> None:
    assert msg.get("event") == "error", msg
    assert "ok" not in msg and "rid" not in msg, msg
    assert msg["error"]["code"] == code, msg
    message = msg["error"]["message"]
    assert isinstance(message, str) and message and "Traceback" not in message and len(message) < 300


def assert_error_reply(msg: dict[str, Any], code: str, *, rid: Any = None, op: str | None = None) -> None:
    assert msg.get("ok") is False and "event" not in msg, msg
    assert msg["error"]["code"] == code, msg
    if rid is not None:
        assert msg.get("rid") == rid, msg
    if op is not None:
        assert msg.get("op") == op, msg
    message = msg["error"]["message"]
    assert isinstance(message, str) and message and "Traceback" not in message and len(message) < 300


def queued_events(client: ChatClient) -> list[dict[str, Any]]:
    """The events waiting in `client`'s queue, left there."""
    return list(client.events._queue)  # type: ignore[attr-defined]  # asyncio.Queue keeps a deque


def names_field(message: str, name: str) -> bool:
    """Does an error message name the field (as `name`, 'name', "name" or `field name`)?"""
    return re.search(rf"[`'\"]{re.escape(name)}[`'\"]|\bfield {re.escape(name)}\b", message) is not None


# --------------------------------------------------------------------------- not JSON objects


NOT_OBJECTS = {
    "garbage": b"\x00\x01\x02 hello there \x7f",
    "invalid-utf8": b"\xff\xfe\xfd",
    "invalid-utf8-in-string": b'{"op": "ping", "rid": "caf\xe9"}',
    "truncated-utf8-in-string": b'{"op": "ping", "rid": "\xe2\x82"}',
    "array": b'[{"op": "ping", "rid": 1}]',
    "number": b"42",
    "float": b"-1.5e300",
    "string": b'"ping"',
    "null": b"null",
    "true": b"true",
    "truncated": b'{"op": "ping", "rid": ',
    "single-quotes": b"{'op': 'ping'}",
    "trailing-garbage": b'{"op": "ping", "rid": 1} xyz',
    "two-objects": b'{"op": "ping"}{"op": "ping"}',
}


@pytest.mark.parametrize("payload", list(NOT_OBJECTS.values()), ids=list(NOT_OBJECTS))
async def test_not_a_json_object_gets_bad_json_and_stays_open(node: NodeProcess, payload: bytes) -> None:
    raw = await Raw.connect(node)
    await raw.send(payload + b"\n")
    assert_error_event(await raw.read(5), "bad_json")
    await raw.ping_ok()
    assert await raw.quiet(0.1) == []
    await raw.close()


async def test_frame_without_op_gets_bad_request(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    await raw.send(b'{"rid": 5, "name": "x"}\n')
    reply = await raw.read(5)
    assert_error_reply(reply, "bad_request", rid=5)
    assert names_field(reply["error"]["message"], "op")
    await raw.send(b'{}\n{"op": 7, "rid": "r"}\n{"op": null, "rid": 8}\n')
    replies = [await raw.read(5) for _ in range(3)]
    for reply, rid in zip(replies, [None, "r", 8], strict=True):
        assert_error_reply(reply, "bad_request", rid=rid)
    assert "rid" not in replies[0]
    await raw.ping_ok()
    await raw.close()


async def test_unknown_op_echoes_rid(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    for rid in ("x1", 99, 0):
        reply = await raw.request(op="teleport", rid=rid, to=1)
        assert_error_reply(reply, "unknown_op", rid=rid)
    reply = await raw.request(op="", rid="empty")
    assert_error_reply(reply, "unknown_op", rid="empty")
    reply = await raw.request(op="x" * 500, rid="long")
    assert_error_reply(reply, "unknown_op", rid="long")
    await raw.ping_ok()
    await raw.close()


async def test_op_needing_login_is_refused_before_login(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("send", {"to": 1, "text": "hi"}), ("friends", {}), ("sync", {"after": 0}), ("logout", {})]
    await raw.send(b"".join(frame(op=op, rid=op, **fields) for op, fields in requests))
    for op in ("send", "friends", "sync", "logout"):
        assert_error_reply(await raw.read(5), "not_logged_in", rid=op, op=op)
    await raw.close()


# --------------------------------------------------------------------------- framing


async def test_request_in_one_byte_writes(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    # TCP_NODELAY: the bytes really leave as separate segments.
    raw.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    name = unique_name("zoë_")  # multi-byte UTF-8, split across writes too
    data = frame(op="register", rid="reg", name=name, password=PASSWORD) + frame(op="ping", rid="p")
    for i in range(len(data)):
        await raw.send(data[i:i + 1])
        await asyncio.sleep(0.003)
    reply = await raw.read(5)
    assert reply["rid"] == "reg" and reply["ok"] is True, reply
    assert isinstance(reply["user_id"], int)
    assert (await raw.read(5))["rid"] == "p"
    # The multi-byte name arrived intact: logging in with it works.
    reply = await raw.request(op="login", rid="l", name=name, password=PASSWORD)
    assert reply["ok"] is True and reply["user"]["name"] == name
    await raw.close()


async def test_frames_split_at_odd_places(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    data = b"".join(frame(op="ping", rid=i) for i in range(40))
    for i in range(0, len(data), 7):
        await raw.send(data[i:i + 7])
    assert [(await raw.read(5))["rid"] for _ in range(40)] == list(range(40))
    await raw.close()


async def test_many_frames_in_one_write_answered_in_order(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    name = unique_name("multi")
    frames = [
        frame(op="ping", rid=1),
        frame(op="fly", rid=2),
        frame(rid=3),
        frame(op="register", rid=4, name="has space", password=PASSWORD),
        frame(op="register", rid=5, name=name, password=PASSWORD),
        frame(op="lookup", rid=6, name=name),
        frame(op="login", rid=7, name=name, password="wrong-password"),
        frame(op="login", rid=8, name=name, password=PASSWORD),
        frame(op="lookup", rid=9, name=name),
        frame(op="ping", rid=10),
    ]
    await raw.send(b"".join(frames))
    replies = [await raw.read(5) for _ in frames]
    assert [r.get("rid") for r in replies] == list(range(1, 11))
    expect = [True, "unknown_op", "bad_request", "bad_request", True, "not_logged_in", "bad_credentials",
              True, True, True]
    assert [r["ok"] if r["ok"] else r["error"]["code"] for r in replies] == expect
    assert names_field(replies[3]["error"]["message"], "name")
    assert replies[8]["user"]["name"] == name
    await raw.close()


async def test_blank_lines_are_ignored(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    await raw.send(b"\n\n   \n\t\n" + frame(op="ping", rid="a") + b"\n\n" + frame(op="ping", rid="b") + b"  \n")
    assert (await raw.read(5))["rid"] == "a"
    assert (await raw.read(5))["rid"] == "b"
    assert await raw.quiet(0.2) == []
    await raw.close()


def padded_ping(rid: str, size: int) -> bytes:
    """A ping frame of exactly `size` bytes (newline excluded)."""
    base = json.dumps({"op": "ping", "rid": rid, "pad": ""}, separators=(",", ":"))
    return (base[:-2] + "x" * (size - len(base)) + '"}').encode()


async def test_frame_over_max_frame_is_refused_and_closed(small_frame_node: NodeProcess) -> None:
    node = small_frame_node
    bystander = await Raw.connect(node)
    raw = await Raw.connect(node)
    exact = padded_ping("exact", 1024)
    assert len(exact) == 1024
    await raw.send(exact + b"\n")
    assert (await raw.read(5))["rid"] == "exact"  # at the limit: fine

    await raw.send(padded_ping("big", 1025) + b"\n")
    await asyncio.sleep(0.05)
    with contextlib.suppress(ConnectionError):
        await raw.send(frame(op="ping", rid="after"))
    got = await raw.read_until_closed(5)
    assert len(got) == 1, got  # nothing after the too-large frame is answered
    assert_error_event(got[0], "frame_too_large")
    await bystander.ping_ok()
    await close_all([bystander])
    await assert_serving(node)


async def test_requests_before_a_too_large_frame_in_the_same_write_are_answered(small_frame_node: NodeProcess) -> None:
    node = small_frame_node
    raw = await Raw.connect(node)
    await raw.send(frame(op="ping", rid="before") + padded_ping("big", 1025) + b"\n")
    got = await raw.read_until_closed(5)
    assert [f.get("rid") or f["error"]["code"] for f in got] == ["before", "frame_too_large"]
    await assert_serving(node)


async def send_huge_line(node: NodeProcess, size: int) -> list[dict[str, Any]]:
    """Send `size` bytes with no newline while reading; the frames the node sent before closing.

    A bare socket: a failed write (the node reset the connection) must not stop us from
    reading what the node wrote before it closed.
    """
    sock = await BareSocket.connect(node, rcvbuf=1 << 20)

    async def write() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(size // MB):
                await sock.send(b"x" * MB)

    writer = asyncio.create_task(write())
    frames = await sock.read_until_closed(10)
    await writer
    await sock.close()
    return frames


async def test_huge_line_without_newline_is_cut_off(node: NodeProcess) -> None:
    """Three clients each send 10 MB with no newline: each is closed with frame_too_large,
    the node's memory stays bounded and others are served meanwhile."""
    rss_before = node_rss(node)
    bystander = await Raw.connect(node)

    async def ping_meanwhile() -> list[float]:
        times = []
        for i in range(10):
            start = time.monotonic()
            await bystander.ping_ok(rid=i)
            times.append(time.monotonic() - start)
            await asyncio.sleep(0.02)
        return times

    huge = asyncio.gather(*(send_huge_line(node, 10 * MB) for _ in range(3)))
    results, ping_times = await asyncio.gather(huge, ping_meanwhile())
    for frames in results:
        assert len(frames) == 1, frames
        assert_error_event(frames[0], "frame_too_large")
    assert max(ping_times) < 1.0, ping_times
    rss = node_rss(node)
    assert rss < 200 * MB, f"node RSS {rss / MB:.0f} MB (was {rss_before / MB:.0f} MB)"
    await bystander.ping_ok()
    await bystander.close()
    await assert_serving(node)


async def test_deep_nesting(node: NodeProcess) -> None:
    raw = await Raw.connect(node)
    await raw.send(b"[" * 50_000 + b"\n")
    assert_error_event(await raw.read(5), "bad_json")
    await raw.send(b"[" * 30_000 + b"]" * 30_000 + b"\n")
    assert_error_event(await raw.read(5), "bad_json")
    # Deep nesting inside a field of a request: an error reply or event, never a crash.
    nested = b"[" * 30_000 + b"]" * 30_000
    await raw.send(b'{"op": "send", "rid": "deep", "to": ' + nested + b', "text": "hi"}\n')
    msg = await raw.read(5)
    if "event" in msg:
        assert_error_event(msg, "bad_json")
    else:
        assert_error_reply(msg, "bad_request", rid="deep")
    await raw.send(b'{"op": "ping", "rid": "extra", "junk": ' + nested + b"}\n")
    msg = await raw.read(5)
    assert msg.get("rid") == "extra" or msg.get("event") == "error", msg  # ignored extra field, or refused
    await raw.ping_ok()
    await raw.close()
    await assert_serving(node)


# --------------------------------------------------------------------------- field validation


MISSING = object()

SEND_BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("to", {"to": MISSING}),
    ("text", {"text": MISSING}),
    ("to", {"to": "2"}),
    ("to", {"to": 2.5}),
    ("to", {"to": -1}),
    ("to", {"to": 0}),
    ("to", {"to": 2**53}),
    ("to", {"to": 10**30}),
    ("to", {"to": None}),
    ("to", {"to": True}),
    ("to", {"to": []}),
    ("to", {"to": {"id": 2}}),
    ("text", {"text": 5}),
    ("text", {"text": ""}),
    ("text", {"text": "x" * 4097}),
    ("text", {"text": None}),
    ("text", {"text": ["hi"]}),
    ("text", {"text": False}),
    ("cmid", {"cmid": 5}),
    ("cmid", {"cmid": ""}),
    ("cmid", {"cmid": "c" * 65}),
    ("cmid", {"cmid": ["a"]}),
    ("rid", {"rid": [1]}),
    ("rid", {"rid": {"a": 1}}),
    ("rid", {"rid": 1.5}),
]


async def test_send_with_wrong_field_types(node: NodeProcess) -> None:
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob")
    await befriend(alice, bob)
    raw = await Raw.connect(node)
    await raw.request(op="login", name=alice.name, password=PASSWORD)  # alice again: kicks the ChatClient

    cases = SEND_BAD_FIELDS
    data = b""
    for i, (_, override) in enumerate(cases):
        fields: dict[str, Any] = {"op": "send", "rid": f"c{i}", "to": bob.id, "text": "hi"} | override
        data += frame(**{k: v for k, v in fields.items() if v is not MISSING})
    await raw.send(data)
    failures = []
    for i, (field, override) in enumerate(cases):
        reply = await raw.read(5)
        expected_rid = None if field == "rid" else f"c{i}"
        ok = (reply.get("ok") is False and reply["error"]["code"] == "bad_request"
              and reply.get("rid") == expected_rid and reply.get("op") == "send"
              and names_field(reply["error"]["message"], field))
        if not ok:
            failures.append((field, override if len(repr(override)) < 80 else "...", reply))
    assert failures == []

    # Limits are inclusive and count characters, not bytes; none of the bad sends went out.
    good = [("x" * 4096, None), ("é" * 4096, "c" * 64), ("😀" * 4096, "d")]
    ids = []
    for text, cmid in good:
        send: dict[str, Any] = {"to": bob.id, "text": text} | ({"cmid": cmid} if cmid else {})
        reply = await raw.request(op="send", **send)
        assert reply["ok"] is True, reply
        ids.append(reply["id"])
    got = [await bob.client.next_event("message") for _ in good]
    assert [m["id"] for m in got] == ids
    assert [m["text"] for m in got] == [text for text, _ in good]
    assert [e for e in drain_events(bob.client) if e.get("event") == "message"] == []
    await close_all([raw, bob])


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_bad_input(small_frame_node: NodeProcess) -> None:
    node = small_frame_node
    ws = await RawWs.connect(node)
    two_objects = '{"op": "ping", "rid": 1}\n{"op": "ping", "rid": 2}'  # one object per message
    for text in ("not json", "[1, 2]", "17", '{"op": "ping", "rid": ', "null", two_objects):
        await ws.send_text(text)
        assert_error_event(await ws.read(5), "bad_json")
    reply = await ws.request(rid=3)
    assert_error_reply(reply, "bad_request", rid=3)
    reply = await ws.request(op="teleport", rid="t")
    assert_error_reply(reply, "unknown_op", rid="t")
    reply = await ws.request(op="send", rid="s", to="me", text="hi")
    assert_error_reply(reply, "bad_request", rid="s")
    assert names_field(reply["error"]["message"], "to")
    await ws.send_text(padded_ping("exact", 1024).decode())
    assert (await ws.read(5))["rid"] == "exact"
    assert (await ws.request(op="ping", rid="alive"))["ok"] is True
    await ws.close()

    # Binary messages: answered as JSON or refused, but never a crash.
    ws = await RawWs.connect(node)
    await ws.send_binary(b'{"op": "ping", "rid": "bin"}')
    msg = await ws.read(5)
    assert msg.get("rid") == "bin" or msg.get("event") == "error", msg
    await ws.send_binary(b"\xff\xfe\x00garbage")
    try:
        msg = await ws.read(5)
        assert msg.get("event") == "error", msg
    except EOFError:
        pass  # closing the connection is fine too
    await ws.close()

    # Over max_frame: error event, then closed.
    ws = await RawWs.connect(node)
    await ws.send_text(padded_ping("big", 1025).decode())
    got = await ws.read_until_closed(5)
    assert len(got) == 1, got
    assert_error_event(got[0], "frame_too_large")
    await assert_serving(node)


async def test_websocket_huge_message_is_refused_and_closed(node: NodeProcess) -> None:
    """A 4 MB text message (far over max_frame): the connection is closed, the node is fine."""
    rss_before = node_rss(node)
    ws = await RawWs.connect(node)
    await ws.send_text("x" * (4 * MB))
    got = await ws.read_until_closed(5)
    assert [f for f in got if "ok" in f] == []
    assert node_rss(node) < rss_before + 50 * MB
    await assert_serving(node)


async def test_websocket_huge_message_gets_frame_too_large(node: NodeProcess) -> None:
    ws = await RawWs.connect(node)
    await ws.send_text("x" * (4 * MB))
    got = await ws.read_until_closed(5)
    assert len(got) == 1, got
    assert_error_event(got[0], "frame_too_large")


# --------------------------------------------------------------------------- a client that never reads


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_client_that_never_reads_is_dropped(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--max-buffer", "65536")
    flooder = await new_user(node, "flooder")
    talker = await new_user(node, "talker", websocket=True)
    listener = await new_user(node, "listener")
    await befriend(talker, listener)

    victim_name = unique_name("sleepy")
    victim = await BareSocket.connect(node, rcvbuf=4096)
    assert (await victim.request(op="register", name=victim_name, password=PASSWORD))["ok"]
    victim_id = (await victim.request(op="login", name=victim_name, password=PASSWORD))["user"]["id"]
    assert (await victim.request(op="friend_request", user_id=flooder.id))["ok"]
    await flooder.client.next_event("friend_request")
    await flooder.call("friend_accept", user_id=victim_id)
    # From here on the victim never reads again.

    latencies: list[float] = []
    done = asyncio.Event()

    async def chat() -> None:
        i = 0
        while not done.is_set():
            start = time.monotonic()
            sent = await talker.call("send", to=listener.id, text=f"still here {i}")
            ev = await listener.client.next_event("message", timeout=5)
            assert ev["id"] == sent["id"]
            latencies.append(time.monotonic() - start)
            i += 1
            await asyncio.sleep(0.01)

    chatter = asyncio.create_task(chat())
    text = "z" * 4000
    acked: list[int] = []
    dropped_after: int | None = None
    extra = 200  # keep sending after the drop: those wait in the inbox
    n = 0
    # Flood until the drop, `extra` more, and until the chat beside it made at least 5 round trips
    # (on a fast machine the flood alone can end before that).
    while n < 6000 and (dropped_after is None or n < dropped_after + extra or len(latencies) < 5):
        rids = [f"f{n + k}" for k in range(50)]
        futures = [flooder.client.expect_reply(rid) for rid in rids]
        await flooder.client.send_raw(b"".join(frame(op="send", rid=rid, to=victim_id, text=text) for rid in rids))
        for reply in await asyncio.gather(*futures):
            assert reply["ok"] is True, reply
            acked.append(reply["id"])
        n += 50
        if dropped_after is None and any(e.get("event") == "presence" for e in queued_events(flooder.client)):
            dropped_after = n
    done.set()
    await chatter

    assert dropped_after is not None, "the node never dropped a client that does not read"
    presence = [e for e in drain_events(flooder.client) if e.get("event") == "presence"]
    assert presence == [{"event": "presence", "user_id": victim_id, "online": False}]
    frames = await victim.read_until_closed(10)  # what the kernel held, then EOF
    assert all(f.get("event") in ("message", "friend_added") for f in frames)
    await victim.close()

    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.2 and max(latencies) < 1.0, latencies
    assert node_rss(node) < 200 * MB

    # Nothing is lost: at the next login every acknowledged message is in the inbox, in order.
    back = await login(node, victim_name)
    inbox = await fetch_inbox(back)
    assert [m["id"] for m in inbox] == acked
    assert [m["seq"] for m in inbox] == list(range(1, len(acked) + 1))
    assert {m["text"] for m in inbox} == {text}
    await close_all([flooder, talker, listener, back])
    await assert_serving(node)


def node_sockets_to(node: NodeProcess, port: int) -> list[str]:
    """States of the node's TCP sockets connected to local port `port` (the client's side)."""
    return [c.status for c in psutil.Process(node.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port]


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("websocket", [False, True], ids=["tcp", "ws"])
async def test_dropped_client_connection_is_released(start_node: StartNode, websocket: bool) -> None:
    """Once a non-reading client is dropped, the node lets go of its socket (it does not wait
    forever for the client to take the data it will never read)."""
    node = start_node("--rate-limit", "0", "--max-buffer", "65536")
    flooder = await new_user(node, "flooder")
    name = unique_name("stuck")
    victim: BareSocket | RawWs
    if websocket:
        victim = await RawWs.connect(node)  # the library stops reading once 16 messages wait
        port = victim.ws.transport.get_extra_info("sockname")[1]
    else:
        victim = await BareSocket.connect(node, rcvbuf=4096)
        port = victim.sock.getsockname()[1]
    assert (await victim.request(op="register", name=name, password=PASSWORD))["ok"]
    victim_id = (await victim.request(op="login", name=name, password=PASSWORD))["user"]["id"]
    assert (await victim.request(op="friend_request", user_id=flooder.id))["ok"]
    await flooder.client.next_event("friend_request")
    await flooder.call("friend_accept", user_id=victim_id)

    for n in range(0, 4000, 50):
        rids = [f"f{n + k}" for k in range(50)]
        futures = [flooder.client.expect_reply(rid) for rid in rids]
        await flooder.client.send_raw(b"".join(frame(op="send", rid=rid, to=victim_id, text="z" * 4000)
                                               for rid in rids))
        await asyncio.gather(*futures)
        if any(e.get("event") == "presence" for e in queued_events(flooder.client)):
            break
    assert (await flooder.client.next_event("presence", timeout=5))["online"] is False
    for _ in range(20):  # 2 s
        if "ESTABLISHED" not in node_sockets_to(node, port):
            break
        await asyncio.sleep(0.1)
    assert "ESTABLISHED" not in node_sockets_to(node, port)
    await close_all([flooder.client, victim])
    await assert_serving(node)


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_fast_websocket_reader_survives_a_burst(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0", "--max-buffer", "65536")
    sender = await new_user(node, "sender")
    readers = [await new_user(node, "tcpreader"), await new_user(node, "wsreader", websocket=True)]
    for reader in readers:
        await befriend(sender, reader)
    burst = 100  # 400 kB at once: a TCP client reading at full speed takes it without trouble
    for reader in readers:
        rids = [f"{reader.name}-{k}" for k in range(burst)]
        futures = [sender.client.expect_reply(rid) for rid in rids]
        await sender.client.send_raw(b"".join(frame(op="send", rid=rid, to=reader.id, text="y" * 4000)
                                              for rid in rids))
        ids = [r["id"] for r in await asyncio.gather(*futures)]
        got: list[int] = []
        with contextlib.suppress(TimeoutError):
            while len(got) < len(ids):
                got.append((await reader.client.next_event("message", timeout=2))["id"])
        assert not reader.client.closed.is_set(), f"{reader.name} was dropped after {len(got)} of {len(ids)}"
        assert got == ids, reader.name
    await close_all([sender, *readers])


async def test_connection_recovers_after_garbage(node: NodeProcess) -> None:
    """After all kinds of garbage on one connection, the node still chats normally on it."""
    raw = await Raw.connect(node)
    await raw.send(b"\xff\n[]\n{}\n" + b"{" * 1000 + b"\n" + frame(op="fly", rid=1))
    frames = [await raw.read(5) for _ in range(5)]
    assert [f.get("event") or f["error"]["code"] for f in frames] == [
        "error", "error", "bad_request", "error", "unknown_op"]
    name = unique_name("after")
    assert (await raw.request(op="register", name=name, password=PASSWORD))["ok"]
    client = await ChatClient.connect(node.host, node.port)
    reply = await client.call("login", name=name, password=PASSWORD)
    assert reply["user"]["name"] == name
    await close_all([raw, client])
    assert_alive(node)
