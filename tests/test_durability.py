"""Durable before acknowledged (PROTOCOL.md sections 3 and 6), on every database.

A node is killed (SIGKILL) or stopped (SIGTERM) in the middle of a pipelined stream of
sends and restarted on the same database: every send that was answered `ok` must reach
its recipient; after the restart nobody is shown online and everyone can log in again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from clusterchat.client import ChatClient
from support.lifecycle_helpers import (
    Raw,
    User,
    befriend,
    close_all,
    drain_events,
    fetch_inbox,
    frame,
    login,
    new_user,
)
from support.node import NodeProcess

StartNode = Callable[..., NodeProcess]

N = 300


@dataclass
class Stream:
    """A pipelined stream of `send`s and what became of each (by index)."""

    texts: list[str]
    futures: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    @property
    def acked(self) -> dict[int, int]:
        """index -> message id of the sends answered ok."""
        return {i: f.result()["id"] for i, f in self.futures.items()
                if f.done() and not f.cancelled() and f.exception() is None and f.result().get("ok")}

    @property
    def refused(self) -> dict[int, dict[str, Any]]:
        """index -> reply of the sends answered with an error."""
        return {i: f.result() for i, f in self.futures.items()
                if f.done() and not f.cancelled() and f.exception() is None and not f.result().get("ok")}

    @property
    def unanswered(self) -> list[int]:
        return [i for i in range(len(self.texts)) if i not in self.acked and i not in self.refused]


async def stream_and_stop(sender: ChatClient, to: int, stop: Callable[[], None], *, stop_after: int,
                          cmid_prefix: str | None = None) -> Stream:
    """Send N messages pipelined, 10 per write, and call `stop` once `stop_after` are acked."""
    stream = Stream([f"message {i}" for i in range(N)])

    async def pump() -> None:
        for start in range(0, N, 10):
            if sender.closed.is_set():
                return  # futures registered before this were failed by the client on close
            chunk = range(start, start + 10)
            data = b""
            for i in chunk:
                stream.futures[i] = sender.expect_reply(f"m{i}")
                extra = {"cmid": f"{cmid_prefix}{i}"} if cmid_prefix else {}
                data += frame(op="send", rid=f"m{i}", to=to, text=stream.texts[i], **extra)
            try:
                await sender.send_raw(data)
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(0.003)

    pumper = asyncio.create_task(pump())
    deadline = time.monotonic() + 30
    while len(stream.acked) < stop_after:
        assert time.monotonic() < deadline, "the node did not acknowledge the sends"
        await asyncio.sleep(0.001)
    stop()
    await pumper
    await asyncio.wait(stream.futures.values(), timeout=10)
    for f in stream.futures.values():
        assert f.done(), "a request was neither answered nor failed by the connection's end"
        f.exception()  # retrieved: ConnectionClosed for the unanswered ones
    return stream


def check_inbox(inbox: list[dict[str, Any]], stream: Stream, sender: User, recipient_id: int) -> dict[int, int]:
    """Every acked send is in the inbox with its id, nothing refused is, order is kept.

    Returns index -> id of the stream's messages found in the inbox.
    """
    index_of = {text: i for i, text in enumerate(stream.texts)}
    seqs = [m["seq"] for m in inbox]
    assert seqs == sorted(set(seqs)), "inbox seqs must strictly increase"
    found: dict[int, int] = {}
    order = []
    for m in inbox:
        if m["text"] not in index_of:
            continue
        i = index_of[m["text"]]
        assert m["from"] == {"id": sender.id, "name": sender.name} and m["to"] == recipient_id, m
        assert i not in found or found[i] == m["id"], f"message {i} stored twice with different ids"
        found[i] = m["id"]
        order.append(i)
    assert order == sorted(order), "messages of one sender must arrive in the order they were sent"
    acked = stream.acked
    missing = {i: mid for i, mid in acked.items() if found.get(i) != mid}
    assert missing == {}, f"{len(missing)} acknowledged messages were lost (of {len(acked)})"
    assert set(found) <= set(acked) | set(stream.unanswered), "a send answered with an error was delivered"
    return found


async def test_acked_messages_survive_sigkill(start_node: StartNode) -> None:
    # `reject` makes "log in again at once" meaningful: no session may survive the kill.
    node = start_node("--rate-limit", "0", "--duplicate-login", "reject")
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob", websocket=True)
    await befriend(alice, bob)
    group = (await alice.call("create_group", name="team"))["group"]
    await bob.call("join_group", group_id=group["id"])
    group_sent = await alice.call("group_send", group_id=group["id"], text="before the kill")

    stream = await stream_and_stop(alice.client, bob.id, node.kill, stop_after=N // 3, cmid_prefix="k")
    assert N // 3 <= len(stream.acked) < N, "the kill did not land in the middle of the stream"
    assert stream.refused == {}
    await asyncio.wait_for(asyncio.gather(alice.client.closed.wait(), bob.client.closed.wait()), 5)

    await asyncio.to_thread(node.start)
    # Nobody is online after the restart, and both log in again at once.
    alice = await login(node, alice.name)
    assert alice.login["friends"] == [{"id": bob.id, "name": bob.name, "online": False}]
    (team,) = alice.login["groups"]
    assert {m["id"]: m["online"] for m in team["members"]} == {alice.id: True, bob.id: False}
    bob = await login(node, bob.name, websocket=True)
    assert bob.login["friends"] == [{"id": alice.id, "name": alice.name, "online": True}]

    inbox = await fetch_inbox(bob)
    assert inbox[0]["id"] == group_sent["id"] and inbox[0]["group_id"] == group["id"]
    found = check_inbox(inbox, stream, alice, bob.id)

    # The client retries what was never answered, with the same cmids: nothing is stored twice,
    # and what the kill kept is answered with its first id.
    last_seq = inbox[-1]["seq"]
    retried = {}
    for i in stream.unanswered:
        reply = await alice.call("send", to=bob.id, text=stream.texts[i], cmid=f"k{i}")
        retried[i] = reply["id"]
        if i in found:
            assert reply["id"] == found[i]
    fresh = [i for i in stream.unanswered if i not in found]
    live = [await bob.client.next_event("message") for _ in fresh]
    assert [m["id"] for m in live] == [retried[i] for i in fresh]
    assert [m["seq"] for m in live] == list(range(last_seq + 1, last_seq + 1 + len(fresh)))
    everything = {m["text"]: m["id"] for m in (await bob.call("sync", after=1, limit=100))["messages"]}
    after = 101
    while len(everything) < N:
        page = (await bob.call("sync", after=after, limit=100))["messages"]
        assert page, "sync ran dry before every message was seen"
        everything.update((m["text"], m["id"]) for m in page)
        after = page[-1]["seq"]
    assert everything == {stream.texts[i]: mid for i, mid in (stream.acked | retried).items()}
    await close_all([alice, bob])


async def test_sigterm_closes_everyone_exits_zero_and_keeps_acked(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob", websocket=True)
    carol = await new_user(node, "carol")
    await befriend(alice, bob)
    await befriend(carol, bob)
    anonymous = await Raw.connect(node)
    await anonymous.ping_ok()
    drain_events(alice.client), drain_events(bob.client), drain_events(carol.client)

    started = 0.0

    def sigterm() -> None:
        nonlocal started
        started = time.monotonic()
        os.kill(node.pid, signal.SIGTERM)

    stream = await stream_and_stop(alice.client, bob.id, sigterm, stop_after=N // 3)
    code = await asyncio.to_thread(node.proc.wait, 10)  # type: ignore[union-attr]
    exited = time.monotonic() - started
    assert code == 0 and exited < 5, (code, exited, node.log_tail())
    # Every connection was closed: logged in or not, TCP or WebSocket.
    await asyncio.wait_for(asyncio.gather(*(u.client.closed.wait() for u in (alice, bob, carol))), 1)
    assert await anonymous.read_until_closed(1) == []
    # A clean stop answers what it still can: `ok` (then it is stored) or `unavailable`.
    assert {r["error"]["code"] for r in stream.refused.values()} <= {"unavailable"}
    assert N // 3 <= len(stream.acked) < N, "SIGTERM did not land in the middle of the stream"
    # Whatever presence the friends saw before their own close is bob going offline.
    seen = [e for u in (alice, carol) for e in drain_events(u.client) if e.get("event") == "presence"]
    assert all(e == {"event": "presence", "user_id": bob.id, "online": False} for e in seen), seen

    await asyncio.to_thread(node.start)
    bob = await login(node, bob.name)
    assert {f["id"]: f["online"] for f in bob.login["friends"]} == {alice.id: False, carol.id: False}
    check_inbox(await fetch_inbox(bob), stream, alice, bob.id)
    await close_all([bob])


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_sigint_stops_cleanly_too(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob", websocket=True)
    await befriend(alice, bob)
    sent = await alice.call("send", to=bob.id, text="before SIGINT")
    await bob.client.next_event("message")
    os.kill(node.pid, signal.SIGINT)
    await asyncio.wait_for(asyncio.gather(alice.client.closed.wait(), bob.client.closed.wait()), 5)
    assert await asyncio.to_thread(node.proc.wait, 5) == 0  # type: ignore[union-attr]
    assert "Traceback" not in node.log_text

    await asyncio.to_thread(node.start)
    bob = await login(node, bob.name)
    assert [m["id"] for m in bob.login["offline"]] == [sent["id"]]  # not acked: delivered again
    await close_all([bob])
