"""Rooms on a standalone node (PROTOCOL.md section 7): the node places every room on itself."""

from __future__ import annotations

import time

from support.node import NodeProcess
from support.users import Chat, assert_error, by_id, quiet


async def test_create_room_is_placed_on_this_node(chat: Chat, node: NodeProcess) -> None:
    alice = await chat.user("alice")
    reply = await alice.call("create_room", name="lobby")
    assert set(reply) == {"op", "rid", "ok", "room"}
    room = reply["room"]
    assert set(room) == {"id", "name", "host", "port", "ws_url"}
    assert isinstance(room["id"], str) and room["id"]
    assert room["name"] == "lobby"
    assert (room["host"], room["port"]) == (node.host, node.port)
    assert room["ws_url"] == f"ws://{node.host}:{node.ws_port}/ws"
    unnamed = (await alice.call("create_room"))["room"]
    assert unnamed["id"] != room["id"] and isinstance(unnamed["name"], str)
    # The creator is not a member until it joins.
    assert_error(await alice.request("room_send", room_id=room["id"], text="hi"), "not_member")
    assert_error(await alice.request("leave_room", room_id=room["id"]), "not_member")
    # The address it gives works: a WebSocket user there can join the room.
    bob = await chat.user("bob", websocket=True)
    joined = await bob.call("join_room", room_id=room["id"])
    assert joined["room"]["members"] == [bob.ref]


async def test_room_join_send_leave(chat: Chat) -> None:
    alice, bob, carol, dave = await chat.users("alice", "bob", "carol", "dave")
    room = (await alice.call("create_room", name="lobby"))["room"]
    rid = room["id"]

    joined = await alice.call("join_room", room_id=rid)
    assert set(joined) == {"op", "rid", "ok", "room"}
    assert joined["room"] == {**room, "members": [alice.ref]}
    joined = await bob.call("join_room", room_id=rid)
    assert joined["room"]["id"] == rid and by_id(joined["room"]["members"]) == by_id([alice.ref, bob.ref])
    assert await alice.event("room_member") == {"event": "room_member", "room_id": rid, "user": bob.ref,
                                                 "joined": True}
    joined = await carol.call("join_room", room_id=rid)
    assert by_id(joined["room"]["members"]) == by_id([alice.ref, bob.ref, carol.ref])
    for other in (alice, bob):
        assert (await other.event("room_member"))["user"] == carol.ref
    assert await quiet(carol.client) == []

    before = int(time.time() * 1000)
    sent = await alice.call("room_send", room_id=rid, text="hello room 👋")
    assert set(sent) == {"op", "rid", "ok", "ts"} and abs(sent["ts"] - before) < 5000
    for other in (bob, carol):
        ev = await other.event("room_message")
        assert ev == {"event": "room_message", "room_id": rid, "from": alice.ref, "text": "hello room 👋",
                      "ts": sent["ts"]}
    assert await quiet(alice.client) == []  # not to the sender
    assert await quiet(dave.client) == []  # not to a non-member
    # Room messages are ephemeral: not in anyone's inbox.
    assert (await bob.call("sync", after=0))["messages"] == []

    assert_error(await dave.request("room_send", room_id=rid, text="let me in"), "not_member")
    assert_error(await dave.request("leave_room", room_id=rid), "not_member")
    assert_error(await alice.request("room_send", room_id=rid, text=""), "bad_request", "text")
    assert_error(await alice.request("room_send", room_id=rid, text="x" * 4097), "bad_request", "text")
    assert_error(await alice.request("join_room"), "bad_request", "room_id")

    assert set(await bob.call("leave_room", room_id=rid)) == {"op", "rid", "ok"}
    for other in (alice, carol):
        assert await other.event("room_member") == {"event": "room_member", "room_id": rid, "user": bob.ref,
                                                     "joined": False}
    assert await quiet(bob.client) == []
    assert_error(await bob.request("room_send", room_id=rid, text="still here?"), "not_member")
    await carol.call("room_send", room_id=rid, text="bob left")
    assert (await alice.event("room_message"))["text"] == "bob left"
    assert await quiet(bob.client) == []

    # A member whose connection drops leaves the room.
    await carol.client.close()
    assert await alice.event("room_member") == {"event": "room_member", "room_id": rid, "user": carol.ref,
                                                 "joined": False}


async def test_no_such_room_and_the_room_ends_with_its_last_member(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    for op, fields in [("join_room", {}), ("room_send", {"text": "hi"}), ("leave_room", {})]:
        assert_error(await alice.request(op, room_id="no-such-room", **fields), "no_such_room")

    rid = (await alice.call("create_room", name="short-lived"))["room"]["id"]
    await alice.call("join_room", room_id=rid)
    await bob.call("join_room", room_id=rid)
    await bob.call("leave_room", room_id=rid)
    await alice.call("leave_room", room_id=rid)  # the last member: the room ends
    assert_error(await bob.request("join_room", room_id=rid), "no_such_room")
    assert_error(await alice.request("room_send", room_id=rid, text="anyone?"), "no_such_room")
    assert_error(await alice.request("leave_room", room_id=rid), "no_such_room")

    # Also when the last member disconnects.
    rid = (await alice.call("create_room"))["room"]["id"]
    await bob.call("join_room", room_id=rid)
    await bob.client.close()
    # The node notices the disconnect a moment later; until then alice (not a member) gets not_member.
    deadline = time.monotonic() + 5
    while (reply := await alice.request("room_send", room_id=rid, text="?"))["error"]["code"] == "not_member":
        assert time.monotonic() < deadline, reply
    assert_error(reply, "no_such_room")


async def test_logout_leaves_every_room(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    rid = (await alice.call("create_room"))["room"]["id"]
    await alice.call("join_room", room_id=rid)
    await bob.call("join_room", room_id=rid)
    await alice.event("room_member")
    await alice.call("logout")
    # A logged-out connection is nobody: it hears nothing of the room, the others see it leave.
    await bob.call("room_send", room_id=rid, text="is alice still here?")
    assert await quiet(alice.client) == []
    assert await bob.event("room_member", within=2) == {"event": "room_member", "room_id": rid,
                                                         "user": alice.ref, "joined": False}
    await bob.call("leave_room", room_id=rid)  # the last member: the room ends
    assert_error(await bob.request("join_room", room_id=rid), "no_such_room")


async def test_a_kicked_session_leaves_its_rooms(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    rid = (await alice.call("create_room"))["room"]["id"]
    await alice.call("join_room", room_id=rid)
    again = await chat.login("alice")  # kicks the first session, which closes
    await alice.event("kicked")
    await again.client.close()
    # No connection of alice's is left in the room, so it has ended.
    assert_error(await bob.request("join_room", room_id=rid), "no_such_room")
