"""Friends (PROTOCOL.md section 4, Friends; section 5 events): requests, accept, reject, unfriend,
the friends list and presence, over real sockets on every database."""

from __future__ import annotations

from support.users import Chat, assert_error, by_id, close_to_now, make_friends, quiet

MISSING_ID = 987_654_321


async def test_request_live_then_accept(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    reply = await alice.call("friend_request", user_id=bob.id, note="hi bob, it's alice")
    assert set(reply) == {"op", "rid", "ok"}
    ev = await bob.event("friend_request")
    assert set(ev) == {"event", "from", "note", "ts"}
    assert ev["from"] == alice.ref and ev["note"] == "hi bob, it's alice" and close_to_now(ev["ts"])
    assert await quiet(alice.client) == []  # the asker gets nothing yet
    assert (await alice.call("friends"))["friends"] == []

    accepted = await bob.call("friend_accept", user_id=alice.id)
    assert set(accepted) == {"op", "rid", "ok", "friend"}
    assert accepted["friend"] == {"id": alice.id, "name": "alice", "online": True}
    added = await alice.event("friend_added")
    assert set(added) == {"event", "friend"}
    assert added["friend"] == {"id": bob.id, "name": "bob", "online": True}
    assert await quiet(bob.client) == []

    assert (await alice.call("friends"))["friends"] == [{"id": bob.id, "name": "bob", "online": True}]
    assert (await bob.call("friends"))["friends"] == [{"id": alice.id, "name": "alice", "online": True}]
    # Friends may message each other at once, both ways.
    await alice.call("send", to=bob.id, text="hello")
    await bob.call("send", to=alice.id, text="hello back")
    assert (await bob.event("message"))["text"] == "hello"
    assert (await alice.event("message"))["text"] == "hello back"

    # Asking or accepting again: already_friends, both ways.
    assert_error(await alice.request("friend_request", user_id=bob.id), "already_friends")
    assert_error(await bob.request("friend_request", user_id=alice.id), "already_friends")
    assert_error(await bob.request("friend_accept", user_id=alice.id), "already_friends")
    assert await quiet(bob.client) == []
    assert await quiet(alice.client) == []


async def test_request_to_an_offline_user_waits_for_its_login(chat: Chat) -> None:
    alice = await chat.user("alice")
    bob_id = await chat.register("bob")
    carol_id = await chat.register("carol")
    await alice.call("friend_request", user_id=bob_id, note="")
    await alice.call("friend_request", user_id=carol_id, note="x" * 256)
    # Asking again refreshes the request rather than duplicating it.
    await alice.call("friend_request", user_id=bob_id, note="second try")

    bob = await chat.login("bob")
    requests = bob.login["friend_requests"]
    assert len(requests) == 1, requests
    assert set(requests[0]) == {"from", "note", "ts"}
    assert requests[0]["from"] == alice.ref and requests[0]["note"] == "second try" and close_to_now(requests[0]["ts"])
    assert bob.login["friends"] == []
    carol = await chat.login("carol")
    assert [(r["from"], r["note"]) for r in carol.login["friend_requests"]] == [(alice.ref, "x" * 256)]

    accepted = await bob.call("friend_accept", user_id=alice.id)
    assert accepted["friend"] == {"id": alice.id, "name": "alice", "online": True}
    assert (await alice.event("friend_added"))["friend"] == {"id": bob.id, "name": "bob", "online": True}
    # Accepted requests are gone at the next login; the friendship is there.
    await bob.call("logout")
    again = await chat.login("bob")
    assert again.login["friend_requests"] == []
    assert again.login["friends"] == [{"id": alice.id, "name": "alice", "online": True}]


async def test_friend_request_errors(chat: Chat) -> None:
    alice = await chat.user("alice")
    bob_id = await chat.register("bob")
    assert_error(await alice.request("friend_request", user_id=MISSING_ID), "no_such_user")
    assert_error(await alice.request("friend_request", user_id=alice.id), "bad_request", "user_id")
    assert_error(await alice.request("friend_request", user_id="2"), "bad_request", "user_id")
    assert_error(await alice.request("friend_request", user_id=0), "bad_request", "user_id")
    assert_error(await alice.request("friend_request", user_id=2**53), "bad_request", "user_id")
    assert_error(await alice.request("friend_request"), "bad_request", "user_id")
    assert_error(await alice.request("friend_request", user_id=bob_id, note="n" * 257), "bad_request", "note")
    assert_error(await alice.request("unfriend", user_id=MISSING_ID), "no_such_user")
    # Accepting a request nobody made befriends nobody.
    assert_error(await alice.request("friend_accept", user_id=bob_id), "bad_request")
    # None of it left a trace: bob has no request, nobody is a friend.
    bob = await chat.login("bob")
    assert bob.login["friend_requests"] == [] and bob.login["friends"] == []
    assert (await alice.call("friends"))["friends"] == []


async def test_friend_accept_of_an_unknown_id_is_no_such_user(chat: Chat) -> None:
    alice = await chat.user("alice")
    assert_error(await alice.request("friend_accept", user_id=MISSING_ID), "no_such_user")


async def test_mutual_requests_accept_each_other(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await alice.call("friend_request", user_id=bob.id, note="me first")
    await bob.event("friend_request")
    reply = await bob.call("friend_request", user_id=alice.id, note="me too")
    assert reply["ok"] is True
    added = await alice.event("friend_added")
    assert added["friend"] == {"id": bob.id, "name": "bob", "online": True}
    # Alice never sees bob's request: it accepted hers instead.
    assert all(e["event"] != "friend_request" for e in await quiet(alice.client))
    assert (await alice.call("friends"))["friends"] == [{"id": bob.id, "name": "bob", "online": True}]
    assert (await bob.call("friends"))["friends"] == [{"id": alice.id, "name": "alice", "online": True}]
    sent = await bob.call("send", to=alice.id, text="we are friends")
    assert (await alice.event("message"))["id"] == sent["id"]
    # No request is left on either side.
    await alice.call("logout")
    await bob.call("logout")
    assert (await chat.login("alice")).login["friend_requests"] == []
    assert (await chat.login("bob")).login["friend_requests"] == []


async def test_reject_drops_the_request_silently(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await alice.call("friend_request", user_id=bob.id, note="please")
    await bob.event("friend_request")
    reply = await bob.call("friend_reject", user_id=alice.id)
    assert set(reply) == {"op", "rid", "ok"}
    assert await quiet(alice.client) == []  # no event to the asker
    assert (await alice.call("friends"))["friends"] == []
    assert_error(await alice.request("send", to=bob.id, text="hi?"), "not_friends")
    assert_error(await bob.request("friend_accept", user_id=alice.id), "bad_request")
    # The request is gone at bob's next login.
    await bob.call("logout")
    bob = await chat.login("bob")
    assert bob.login["friend_requests"] == [] and bob.login["friends"] == []
    # Rejecting again, or a request that never was, is harmless.
    assert (await bob.call("friend_reject", user_id=alice.id))["ok"] is True
    # Alice may ask again.
    await alice.call("friend_request", user_id=bob.id, note="again")
    assert (await bob.event("friend_request"))["note"] == "again"


async def test_unfriend(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    await make_friends(alice, carol)
    await alice.call("send", to=bob.id, text="before")
    await bob.event("message")

    reply = await alice.call("unfriend", user_id=bob.id)
    assert set(reply) == {"op", "rid", "ok"}
    removed = await bob.event("friend_removed")
    assert removed == {"event": "friend_removed", "user_id": alice.id}
    assert await quiet(alice.client) == []
    assert await quiet(carol.client) == []

    assert_error(await alice.request("send", to=bob.id, text="after"), "not_friends")
    assert_error(await bob.request("send", to=alice.id, text="after"), "not_friends")
    assert_error(await bob.request("history", **{"with": alice.id}), "not_friends")
    assert (await alice.call("friends"))["friends"] == [{"id": carol.id, "name": "carol", "online": True}]
    assert (await bob.call("friends"))["friends"] == []
    assert_error(await alice.request("unfriend", user_id=bob.id), "not_friends")
    assert_error(await bob.request("unfriend", user_id=alice.id), "not_friends")
    assert await quiet(bob.client) == []
    # Carol is still alice's friend.
    await carol.call("send", to=alice.id, text="still friends")
    assert (await alice.event("message"))["text"] == "still friends"
    # It lasts: bob's next login has no alice, and they can become friends again.
    await bob.call("logout")
    bob = await chat.login("bob")
    assert bob.login["friends"] == []
    await make_friends(bob, alice)
    await bob.call("send", to=alice.id, text="friends again")
    assert (await alice.event("message"))["text"] == "friends again"


async def test_presence_and_online_flags(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    await make_friends(bob, carol)
    dave = await chat.user("dave")
    dave_id = dave.id
    await make_friends(alice, dave)
    await dave.client.close()
    assert await alice.event("presence") == {"event": "presence", "user_id": dave_id, "online": False}

    # Bob logs out: his online friends hear it.
    await bob.call("logout")
    assert await alice.event("presence") == {"event": "presence", "user_id": bob.id, "online": False}
    assert await carol.event("presence") == {"event": "presence", "user_id": bob.id, "online": False}
    assert by_id((await alice.call("friends"))["friends"]) == by_id([
        {"id": bob.id, "name": "bob", "online": False}, {"id": dave_id, "name": "dave", "online": False}])

    # Bob logs in again (on WebSocket): presence online, and his login reply shows who is online.
    bob = await chat.login("bob", websocket=True)
    assert await alice.event("presence") == {"event": "presence", "user_id": bob.id, "online": True}
    assert await carol.event("presence") == {"event": "presence", "user_id": bob.id, "online": True}
    assert by_id(bob.login["friends"]) == by_id([
        {"id": alice.id, "name": "alice", "online": True}, {"id": carol.id, "name": "carol", "online": True}])
    assert (await carol.call("friends"))["friends"] == [{"id": bob.id, "name": "bob", "online": True}]

    # Carol's connection drops: bob hears it, alice (not her friend) does not.
    await carol.client.close()
    assert await bob.event("presence") == {"event": "presence", "user_id": carol.id, "online": False}
    assert all(e["event"] != "presence" for e in await quiet(alice.client))
    assert by_id((await bob.call("friends"))["friends"]) == by_id([
        {"id": alice.id, "name": "alice", "online": True}, {"id": carol.id, "name": "carol", "online": False}])

    # Alice logs in fresh: her friends list shows bob online, dave offline.
    await alice.client.close()
    assert await bob.event("presence") == {"event": "presence", "user_id": alice.id, "online": False}
    alice = await chat.login("alice")
    assert by_id(alice.login["friends"]) == by_id([
        {"id": bob.id, "name": "bob", "online": True}, {"id": dave_id, "name": "dave", "online": False}])
    assert await bob.event("presence") == {"event": "presence", "user_id": alice.id, "online": True}
    # Nobody hears of their own presence.
    assert all(e.get("user_id") != alice.id for e in await quiet(alice.client))
