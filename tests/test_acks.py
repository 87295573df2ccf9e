"""Acks are answered at once and stored shortly after (docs/design.md, "Acks"), on every database.

What a user must still get: an acknowledged message is not delivered again at the next
login, whether that login comes at once (same node, new connection, token login, which is
faster than the store delay), after a clean stop, or after a SIGKILL that came later than
the store delay.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

from support.lifecycle_helpers import User, befriend, close_all, login, new_user
from support.node import NodeProcess

StartNode = Callable[..., NodeProcess]


async def _three_messages(node: NodeProcess) -> tuple[User, User, list[dict[str, Any]]]:
    alice = await new_user(node, "alice")
    bob = await new_user(node, "bob")
    await befriend(alice, bob)
    for i in range(3):
        await alice.call("send", to=bob.id, text=f"m{i}")
    received = [await bob.client.next_event("message") for _ in range(3)]
    assert [m["text"] for m in received] == ["m0", "m1", "m2"]
    return alice, bob, received


async def test_an_ack_is_stored_soon_after_its_reply_and_survives_sigkill(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice, bob, received = await _three_messages(node)
    reply = await bob.call("ack", seq=received[1]["seq"])
    assert reply["ok"] is True
    await asyncio.sleep(0.5)  # ten times the store delay
    node.kill()
    await asyncio.wait_for(asyncio.gather(alice.client.closed.wait(), bob.client.closed.wait()), 5)

    await asyncio.to_thread(node.start)
    bob = await login(node, bob.name)
    assert [m["id"] for m in bob.login["offline"]] == [received[2]["id"]]
    await close_all([bob])


async def test_a_login_right_after_an_ack_does_not_get_the_acked_messages(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice, bob, received = await _three_messages(node)
    token = bob.login["token"]

    # A second login (with the token: no password hashing to wait for) replaces the session
    # that acked a moment before.
    await bob.call("ack", seq=received[2]["seq"])
    again = await login(node, bob.name, token=token)
    assert again.login["offline"] == []
    await asyncio.wait_for(bob.client.closed.wait(), 5)

    # The same after the acking connection closed on its own.
    await alice.call("send", to=bob.id, text="m3")
    m3 = await again.client.next_event("message")
    await again.call("ack", seq=m3["seq"])
    await again.client.close()
    third = await login(node, bob.name, token=token)
    assert third.login["offline"] == []
    await close_all([alice, third])


async def test_sigterm_stores_the_acks_still_waiting(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    _alice, bob, received = await _three_messages(node)
    await bob.call("ack", seq=received[2]["seq"])
    os.kill(node.pid, signal.SIGTERM)  # at once: the ack has not been stored yet
    assert await asyncio.to_thread(node.proc.wait, 10) == 0  # type: ignore[union-attr]

    await asyncio.to_thread(node.start)
    bob = await login(node, bob.name)
    assert bob.login["offline"] == []
    await close_all([bob])


async def test_an_ack_past_the_inbox_acknowledges_only_what_is_there(start_node: StartNode) -> None:
    node = start_node("--rate-limit", "0")
    alice, bob, received = await _three_messages(node)
    await bob.call("ack", seq=received[2]["seq"] + 100)  # a seq not handed out yet
    # Sent within the store delay, so stored in the same transaction as the waiting ack:
    # that ack must not acknowledge it.
    await alice.call("send", to=bob.id, text="after")
    await bob.client.next_event("message")
    await bob.client.close()
    bob = await login(node, bob.name)
    assert [m["text"] for m in bob.login["offline"]] == ["after"]
    await close_all([alice, bob])
