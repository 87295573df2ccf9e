"""Messages (PROTOCOL.md section 4, Messages; section 6 delivery): send, group_send, ack, sync,
history, cmid, ordering and offline delivery, over real sockets on every database."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from clusterchat.client import ChatClient
from support.users import Chat, User, assert_error, close_to_now, make_friends, quiet

MISSING_ID = 987_654_321
MESSAGE_FIELDS_DIRECT = {"event", "seq", "id", "from", "to", "text", "ts"}
MESSAGE_FIELDS_GROUP = {"event", "seq", "id", "from", "group_id", "text", "ts"}


async def pipeline(client: ChatClient, requests: list[dict[str, Any]], *,
                   websocket: bool = False) -> list[dict[str, Any]]:
    """Send every request without waiting for any reply (over TCP in one write; over WebSocket one
    message each, back to back); the replies, in order."""
    base = f"p{id(requests)}-"
    futures = [client.expect_reply(f"{base}{i}") for i in range(len(requests))]
    frames = [json.dumps({**r, "rid": f"{base}{i}"}).encode() + b"\n" for i, r in enumerate(requests)]
    if websocket:
        for frame in frames:
            await client.send_raw(frame)
    else:
        await client.send_raw(b"".join(frames))
    return list(await asyncio.wait_for(asyncio.gather(*futures), 60))


async def messages_of(user: User, count: int) -> list[dict[str, Any]]:
    return [await user.event("message") for _ in range(count)]


# --------------------------------------------------------------------------- send


async def test_send_to_a_friend(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    sent = await alice.call("send", to=bob.id, text="hello bob")
    assert set(sent) == {"op", "rid", "ok", "id", "ts"}
    assert isinstance(sent["id"], int) and 1 <= sent["id"] < 2**53 and close_to_now(sent["ts"])
    ev = await bob.event("message")
    assert ev == {"event": "message", "seq": 1, "id": sent["id"], "from": alice.ref, "to": bob.id,
                  "text": "hello bob", "ts": sent["ts"]}
    assert set(ev) == MESSAGE_FIELDS_DIRECT
    assert await quiet(alice.client) == []  # the sender gets no event of its own message

    back = await bob.call("send", to=alice.id, text="hi alice")
    assert back["id"] > sent["id"]
    ev = await alice.event("message")
    assert ev["seq"] == 1 and ev["id"] == back["id"] and ev["from"] == bob.ref and ev["to"] == alice.id
    second = await alice.call("send", to=bob.id, text="second")
    assert (await bob.event("message"))["seq"] == 2 and second["id"] > back["id"]

    assert_error(await alice.request("send", to=carol.id, text="not a friend"), "not_friends")
    assert_error(await alice.request("send", to=MISSING_ID, text="nobody"), "no_such_user")
    assert_error(await alice.request("send", to=bob.id, text=""), "bad_request", "text")
    assert_error(await alice.request("send", to=bob.id, text="x" * 4097), "bad_request", "text")
    assert_error(await alice.request("send", to=bob.id), "bad_request", "text")
    assert_error(await alice.request("send", to=str(bob.id), text="hi"), "bad_request", "to")
    assert_error(await alice.request("send", text="hi"), "bad_request", "to")
    assert_error(await alice.request("send", to=bob.id, text="hi", cmid=""), "bad_request", "cmid")
    assert_error(await alice.request("send", to=bob.id, text="hi", cmid="c" * 65), "bad_request", "cmid")
    # None of the failures was delivered or stored.
    assert await quiet(bob.client) == [] and await quiet(carol.client) == []
    history = (await bob.call("history", **{"with": alice.id}))["messages"]
    assert [m["text"] for m in history] == ["hello bob", "hi alice", "second"]


async def test_group_send_reaches_every_member_but_the_sender(chat: Chat) -> None:
    alice, bob, carol, dave = await chat.users("alice", "bob", "carol", "dave")
    gid = (await alice.call("create_group", name="team"))["group"]["id"]
    for user in (bob, carol):
        await user.call("join_group", group_id=gid)
    await quiet(alice.client)
    await quiet(bob.client)

    sent = await bob.call("group_send", group_id=gid, text="hello team")
    assert set(sent) == {"op", "rid", "ok", "id", "ts"} and close_to_now(sent["ts"])
    for member in (alice, carol):
        ev = await member.event("message")
        assert set(ev) == MESSAGE_FIELDS_GROUP
        assert ev == {"event": "message", "seq": 1, "id": sent["id"], "from": bob.ref, "group_id": gid,
                      "text": "hello team", "ts": sent["ts"]}
    assert await quiet(bob.client) == []
    assert await quiet(dave.client) == []
    # Group messages and direct messages share each user's inbox sequence.
    await make_friends(alice, carol)
    await alice.call("send", to=carol.id, text="direct")
    await alice.call("group_send", group_id=gid, text="to all")
    assert [(e["seq"], e["text"]) for e in await messages_of(carol, 2)] == [(2, "direct"), (3, "to all")]
    assert [(e["seq"], e["text"]) for e in await messages_of(bob, 1)] == [(1, "to all")]
    assert_error(await dave.request("group_send", group_id=gid, text="let me in"), "not_member")
    assert_error(await alice.request("group_send", group_id=gid, text=""), "bad_request", "text")
    assert await quiet(bob.client) == []


async def test_all_group_members_see_the_same_order(chat: Chat) -> None:
    members = await chat.users("m0", "m1", "m2", "m3", "m4")
    gid = (await members[0].call("create_group", name="busy"))["group"]["id"]
    for user in members[1:]:
        await user.call("join_group", group_id=gid)
    # One message first, so the bursts below do not start right after a join (see
    # test_pipelined_group_sends_right_after_a_join_keep_their_order for that case).
    await members[4].call("group_send", group_id=gid, text="warm-up")
    for user in members[:4]:
        assert (await user.event("message"))["text"] == "warm-up"
    for user in members:
        await quiet(user.client)

    per_sender = 25
    senders = members[:4]
    replies = await asyncio.gather(*(
        pipeline(user.client, [{"op": "group_send", "group_id": gid, "text": f"{user.name}:{i}"}
                               for i in range(per_sender)])
        for user in senders))
    sent_ids = {r["id"] for rs in replies for r in rs}
    assert all(r["ok"] for rs in replies for r in rs) and len(sent_ids) == per_sender * len(senders)

    received: dict[str, list[dict[str, Any]]] = {}
    for user in members:
        expected = per_sender * len(senders) - (per_sender if user in senders else 0)
        received[user.name] = await messages_of(user, expected)
        assert await quiet(user.client) == []
    # Each member: strictly increasing seq, and each sender's messages in the order sent.
    for name, events in received.items():
        seqs = [e["seq"] for e in events]
        first = 1 if name == "m4" else 2
        assert seqs == list(range(first, first + len(events))), name
        for sender in senders:
            texts = [e["text"] for e in events if e["from"]["id"] == sender.id]
            if sender.name != name:
                assert texts == [f"{sender.name}:{i}" for i in range(per_sender)], name
    # Every two members see the messages they both received in the same order.
    orders = {name: [e["id"] for e in events] for name, events in received.items()}
    for a in orders:
        for b in orders:
            common = set(orders[a]) & set(orders[b])
            assert [i for i in orders[a] if i in common] == [i for i in orders[b] if i in common], (a, b)
    # ... which is also the group's history order.
    history: list[int] = []
    before: int | None = None
    while True:
        page = (await members[4].call("history", group_id=gid, limit=100,
                                      **({"before": before} if before else {})))["messages"]
        history = [m["id"] for m in page] + history
        if len(page) < 100:
            break
        before = page[0]["id"]
    assert history[1:] == orders["m4"]


async def test_pipelined_group_sends_right_after_a_join_keep_their_order(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    gid = (await alice.call("create_group", name="team"))["group"]["id"]
    await bob.call("join_group", group_id=gid)
    replies = await pipeline(alice.client, [{"op": "group_send", "group_id": gid, "text": f"g{i}"}
                                            for i in range(100)])
    assert all(r["ok"] for r in replies)
    events = await messages_of(bob, 100)
    # Section 6: messages from one sender to one recipient arrive in the order they were sent.
    assert [e["text"] for e in events] == [f"g{i}" for i in range(100)]
    assert [r["id"] for r in replies] == sorted(r["id"] for r in replies)


async def test_pipelined_sends_arrive_in_order(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    replies = await pipeline(alice.client, [{"op": "send", "to": bob.id, "text": f"message {i}"}
                                            for i in range(200)])
    assert all(r["ok"] for r in replies)
    ids = [r["id"] for r in replies]
    assert ids == sorted(ids) and len(set(ids)) == 200
    events = await messages_of(bob, 200)
    assert [e["text"] for e in events] == [f"message {i}" for i in range(200)]
    assert [e["id"] for e in events] == ids
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    assert await quiet(bob.client) == []


# --------------------------------------------------------------------------- offline, ack, sync


async def test_offline_delivery_and_cumulative_ack(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    await bob.client.close()
    await alice.event("presence")
    sent = [await alice.call("send", to=bob.id, text=f"offline {i}") for i in range(5)]

    bob = await chat.login("bob")
    offline = bob.login["offline"]
    assert bob.login["more"] is False
    assert [m["id"] for m in offline] == [s["id"] for s in sent]  # oldest first
    assert [m["seq"] for m in offline] == [1, 2, 3, 4, 5]
    assert offline[0] == {"event": "message", "seq": 1, "id": sent[0]["id"], "from": alice.ref,
                          "to": bob.id, "text": "offline 0", "ts": sent[0]["ts"]}
    assert await quiet(bob.client) == []  # delivered in the reply, not again as events
    # New messages flow live after the login, continuing the sequence.
    live = await alice.call("send", to=bob.id, text="live")
    ev = await bob.event("message")
    assert ev["seq"] == 6 and ev["id"] == live["id"]

    # Not acked: everything again at the next login.
    await bob.client.close()
    bob = await chat.login("bob")
    assert [m["seq"] for m in bob.login["offline"]] == [1, 2, 3, 4, 5, 6]
    # Ack 3: cumulative, so 1..3 are done; 4..6 come again at the next login.
    assert set(await bob.call("ack", seq=3)) == {"op", "rid", "ok"}
    await bob.call("ack", seq=2)  # an older ack does not move the cursor back
    await bob.call("logout")
    bob = await chat.login("bob")
    assert [m["seq"] for m in bob.login["offline"]] == [4, 5, 6]
    assert [m["text"] for m in bob.login["offline"]] == ["offline 3", "offline 4", "live"]
    await bob.call("ack", seq=6)
    await bob.call("ack", seq=1_000_000)  # beyond the inbox: acknowledges all there is, no more
    await bob.call("logout")
    bob = await chat.login("bob")
    assert bob.login["offline"] == [] and bob.login["more"] is False
    # Later messages are not swallowed by the too-large ack.
    after = await alice.call("send", to=bob.id, text="after the big ack")
    assert (await bob.event("message"))["seq"] == 7
    await bob.client.close()
    bob = await chat.login("bob")
    assert [(m["seq"], m["id"]) for m in bob.login["offline"]] == [(7, after["id"])]
    assert_error(await bob.request("ack", seq=-1), "bad_request", "seq")
    assert_error(await bob.request("ack"), "bad_request", "seq")


async def test_sync_after_and_limit(chat: Chat) -> None:
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    sent = await pipeline(alice.client, [{"op": "send", "to": bob.id, "text": f"m{i}"} for i in range(12)])
    await messages_of(bob, 12)
    await bob.call("ack", seq=12)

    page = await bob.call("sync", after=0)
    assert set(page) == {"op", "rid", "ok", "messages", "more"}
    assert [m["seq"] for m in page["messages"]] == list(range(1, 13)) and page["more"] is False  # acked too
    assert [m["id"] for m in page["messages"]] == [s["id"] for s in sent]
    assert page["messages"][0] == {"event": "message", "seq": 1, "id": sent[0]["id"], "from": alice.ref,
                                   "to": bob.id, "text": "m0", "ts": sent[0]["ts"]}
    page = await bob.call("sync", after=4, limit=5)
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7, 8, 9] and page["more"] is True
    page = await bob.call("sync", after=9, limit=3)
    assert [m["seq"] for m in page["messages"]] == [10, 11, 12] and page["more"] is False
    page = await bob.call("sync", after=12)
    assert page["messages"] == [] and page["more"] is False
    page = await bob.call("sync", after=500)
    assert page["messages"] == [] and page["more"] is False
    assert_error(await bob.request("sync", after=0, limit=0), "bad_request", "limit")
    assert_error(await bob.request("sync", after=0, limit=101), "bad_request", "limit")
    assert_error(await bob.request("sync"), "bad_request", "after")
    assert_error(await bob.request("sync", after="0"), "bad_request", "after")
    assert len((await bob.call("sync", after=0, limit=100))["messages"]) == 12
    # Sync is only a read: live messages keep flowing afterwards.
    await alice.call("send", to=bob.id, text="later")
    assert (await bob.event("message"))["seq"] == 13


async def test_more_than_500_waiting_then_sync_pages_the_rest(chat: Chat) -> None:
    alice = await chat.user("alice")
    bob_id = await chat.register("bob")
    bob = await chat.login("bob")
    await make_friends(alice, bob)
    await bob.client.close()
    total = 530
    for start in range(0, total, 265):
        replies = await pipeline(alice.client, [{"op": "send", "to": bob_id, "text": f"n{i}"}
                                                for i in range(start, start + 265)])
        assert all(r["ok"] for r in replies)

    bob = await chat.login("bob")
    offline = bob.login["offline"]
    assert bob.login["more"] is True and len(offline) == 500
    assert [m["seq"] for m in offline] == list(range(1, 501))
    assert [m["text"] for m in offline] == [f"n{i}" for i in range(500)]
    # A message sent while bob has not caught up is not lost nor out of order.
    late = await alice.call("send", to=bob_id, text="late")
    rest: list[dict[str, Any]] = []
    after = offline[-1]["seq"]
    while True:
        page = await bob.call("sync", after=after, limit=100)
        rest += page["messages"]
        if not page["more"]:
            break
        after = page["messages"][-1]["seq"]
    assert [m["seq"] for m in rest] == list(range(501, total + 2))
    assert [m["text"] for m in rest] == [f"n{i}" for i in range(500, total)] + ["late"]
    assert rest[-1]["id"] == late["id"]
    # Once synced, new messages arrive live with the next seq, and nothing is sent twice.
    await alice.call("send", to=bob_id, text="live again")
    events = [e for e in [await bob.event("message"), *await quiet(bob.client)] if e["event"] == "message"]
    assert [(e["seq"], e["text"]) for e in events] == [(total + 2, "live again")]
    # Acking part of it: the next login starts right after the ack; `more` until at most 500 wait.
    await bob.call("ack", seq=20)
    await bob.call("logout")
    bob = await chat.login("bob")
    assert bob.login["more"] is True and len(bob.login["offline"]) == 500
    assert bob.login["offline"][0]["seq"] == 21
    await bob.call("ack", seq=total + 2 - 500)
    await bob.call("logout")
    bob = await chat.login("bob")
    assert bob.login["more"] is False and len(bob.login["offline"]) == 500
    assert bob.login["offline"][-1]["text"] == "live again"


# --------------------------------------------------------------------------- history


async def test_history_of_a_conversation(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    await make_friends(alice, carol)
    sent = []
    for i in range(7):
        sender, to = (alice, bob) if i % 2 == 0 else (bob, alice)
        sent.append((sender, await sender.call("send", to=to.id, text=f"h{i}")))
    await alice.call("send", to=carol.id, text="other conversation")
    ids = [r["id"] for _, r in sent]

    full = await alice.call("history", **{"with": bob.id})
    assert set(full) == {"op", "rid", "ok", "messages"}
    assert [m["id"] for m in full["messages"]] == ids  # oldest first, nothing of the other conversation
    sender, first = sent[0]
    assert full["messages"][0] == {"id": first["id"], "from": alice.ref, "to": bob.id, "text": "h0", "ts": first["ts"]}
    assert full["messages"][1]["from"] == bob.ref and full["messages"][1]["to"] == alice.id
    assert (await bob.call("history", **{"with": alice.id}))["messages"] == full["messages"]  # both sides alike

    newest = await alice.call("history", limit=3, **{"with": bob.id})
    assert [m["id"] for m in newest["messages"]] == ids[4:]
    page = await alice.call("history", before=ids[4], limit=3, **{"with": bob.id})
    assert [m["id"] for m in page["messages"]] == ids[1:4]
    page = await alice.call("history", before=ids[1], limit=3, **{"with": bob.id})
    assert [m["id"] for m in page["messages"]] == ids[:1]  # fewer than limit: the last page
    page = await alice.call("history", before=ids[0], **{"with": bob.id})
    assert page["messages"] == []
    assert [m["text"] for m in (await carol.call("history", **{"with": alice.id}))["messages"]] == [
        "other conversation"]

    assert_error(await alice.request("history"), "bad_request")
    assert_error(await alice.request("history", group_id=1, **{"with": bob.id}), "bad_request")
    assert_error(await alice.request("history", limit=0, **{"with": bob.id}), "bad_request", "limit")
    assert_error(await alice.request("history", limit=101, **{"with": bob.id}), "bad_request", "limit")
    assert_error(await alice.request("history", before="x", **{"with": bob.id}), "bad_request", "before")
    assert_error(await bob.request("history", **{"with": carol.id}), "not_friends")
    assert_error(await bob.request("history", **{"with": MISSING_ID}), "no_such_user")


async def test_history_default_limit_and_groups(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    gid = (await alice.call("create_group", name="team"))["group"]["id"]
    other = (await alice.call("create_group", name="other"))["group"]["id"]
    await bob.call("join_group", group_id=gid)
    replies = [await alice.call("group_send", group_id=gid, text=f"g{i}") for i in range(60)]
    await bob.call("group_send", group_id=gid, text="from bob")
    await alice.call("group_send", group_id=other, text="elsewhere")
    await alice.call("send", to=bob.id, text="direct")
    ids = [r["id"] for r in replies]

    page = await bob.call("history", group_id=gid)
    assert len(page["messages"]) == 50  # the default limit
    assert [m["text"] for m in page["messages"]] == [f"g{i}" for i in range(11, 60)] + ["from bob"]
    assert page["messages"][0] == {"id": ids[11], "from": alice.ref, "group_id": gid, "text": "g11",
                                   "ts": page["messages"][0]["ts"]}
    older = await bob.call("history", group_id=gid, before=ids[11])
    assert [m["id"] for m in older["messages"]] == ids[:11]
    limited = await bob.call("history", group_id=gid, before=ids[11], limit=4)
    assert [m["id"] for m in limited["messages"]] == ids[7:11]
    assert_error(await carol.request("history", group_id=gid), "not_member")
    # Direct history is unaffected by group traffic.
    assert [m["text"] for m in (await bob.call("history", **{"with": alice.id}))["messages"]] == ["direct"]


# --------------------------------------------------------------------------- cmid, text, transports


async def test_cmid_makes_a_send_idempotent(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    await make_friends(alice, bob)
    await make_friends(carol, bob)
    first = await alice.call("send", to=bob.id, text="once", cmid="c-1")
    again = await alice.call("send", to=bob.id, text="once", cmid="c-1")
    assert (again["id"], again["ts"]) == (first["id"], first["ts"])
    ev = await bob.event("message")
    assert ev["id"] == first["id"]
    assert await quiet(bob.client) == []  # delivered once

    # Another sender may use the same cmid: a different message.
    other = await carol.call("send", to=bob.id, text="mine", cmid="c-1")
    assert other["id"] != first["id"]
    assert (await bob.event("message"))["id"] == other["id"]
    # The same cmid twice in one pipelined burst: one message.
    burst = await pipeline(alice.client, [{"op": "send", "to": bob.id, "text": "burst", "cmid": "c-2"}] * 3)
    assert len({(r["id"], r["ts"]) for r in burst}) == 1
    assert (await bob.event("message"))["id"] == burst[0]["id"]
    assert await quiet(bob.client) == []
    # Group sends too.
    gid = (await alice.call("create_group", name="team"))["group"]["id"]
    await bob.call("join_group", group_id=gid)
    g1 = await alice.call("group_send", group_id=gid, text="group once", cmid="g-1")
    g2 = await alice.call("group_send", group_id=gid, text="group once", cmid="g-1")
    assert (g1["id"], g1["ts"]) == (g2["id"], g2["ts"])
    assert (await bob.event("message"))["id"] == g1["id"]
    assert await quiet(bob.client) == []
    # Without a cmid, the same text is a new message each time.
    plain = [await alice.call("send", to=bob.id, text="once") for _ in range(2)]
    assert plain[0]["id"] != plain[1]["id"]
    texts = [m["text"] for m in (await bob.call("history", **{"with": alice.id}))["messages"]]
    assert texts == ["once", "burst", "once", "once"]
    assert [e["id"] for e in await messages_of(bob, 2)] == [p["id"] for p in plain]
    # Stored only once, also in the offline inbox.
    await bob.client.close()
    bob = await chat.login("bob")
    ids = [m["id"] for m in bob.login["offline"]]
    assert len(ids) == len(set(ids)) == 6


TEXT_4096 = ("ascii é ñ ü ß 中文 日本語 한국어 עברית العربية 😀👍🏽👨‍👩‍👧 \u0301 \t \\ \" ' </script> \u2028 "
             * 60)[:4095] + "🎉"


async def test_long_and_unicode_text_round_trips(chat: Chat) -> None:
    assert len(TEXT_4096) == 4096
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    gid = (await alice.call("create_group", name="unicode"))["group"]["id"]
    await bob.call("join_group", group_id=gid)
    emoji = "🙂" * 4096
    texts = [TEXT_4096, emoji, "x" * 4096, "a", "\u007f del \u0085 nel \ufeff bom \U0010ffff"]
    for text in texts:
        sent = await alice.call("send", to=bob.id, text=text)
        ev = await bob.event("message")
        assert ev["text"] == text and ev["id"] == sent["id"]
    await alice.call("group_send", group_id=gid, text=emoji)
    assert (await bob.event("message"))["text"] == emoji
    assert_error(await alice.request("send", to=bob.id, text="🙂" * 4097), "bad_request", "text")
    # Read back from the database: history, sync and the offline inbox.
    history = (await bob.call("history", **{"with": alice.id}))["messages"]
    assert [m["text"] for m in history] == texts
    assert (await bob.call("history", group_id=gid))["messages"][0]["text"] == emoji
    assert [m["text"] for m in (await bob.call("sync", after=0))["messages"]] == [*texts, emoji]
    await bob.client.close()
    bob = await chat.login("bob")
    assert [m["text"] for m in bob.login["offline"]] == [*texts, emoji]


async def test_tcp_and_websocket_users_chat(chat: Chat) -> None:
    tcp = await chat.user("tcp_user")
    ws = await chat.user("ws_user", websocket=True)
    await make_friends(ws, tcp)
    sent = await tcp.call("send", to=ws.id, text="over tcp ✓")
    assert await ws.event("message") == {"event": "message", "seq": 1, "id": sent["id"], "from": tcp.ref,
                                         "to": ws.id, "text": "over tcp ✓", "ts": sent["ts"]}
    replies = await pipeline(ws.client, [{"op": "send", "to": tcp.id, "text": f"ws {i}"} for i in range(20)],
                             websocket=True)
    events = await messages_of(tcp, 20)
    assert [e["id"] for e in events] == [r["id"] for r in replies]
    assert [e["seq"] for e in events] == list(range(1, 21))
    gid = (await ws.call("create_group", name="mixed"))["group"]["id"]
    await tcp.call("join_group", group_id=gid)
    assert (await ws.event("group_member"))["user"] == tcp.ref
    g = await tcp.call("group_send", group_id=gid, text="group over tcp")
    assert (await ws.event("message"))["id"] == g["id"]
    g = await ws.call("group_send", group_id=gid, text="group over ws")
    assert (await tcp.event("message"))["id"] == g["id"]
    await ws.call("ack", seq=2)
    await ws.call("logout")
    assert await tcp.event("presence") == {"event": "presence", "user_id": ws.id, "online": False}


async def test_a_cmid_with_nul_is_refused_and_fails_no_other_message(chat: Chat) -> None:
    """U+0000 cannot be stored by PostgreSQL, so every node refuses it in `cmid` too (such a send
    failed there as unavailable); the send before it is stored and its cmid still recognised."""
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    sends = [("before", "a"), ("nul", "a\u0000b"), ("after", "a\u0000c")]
    replies = await pipeline(alice.client, [{"op": "send", "to": bob.id, "text": t, "cmid": c} for t, c in sends])
    assert [r["ok"] for r in replies] == [True, False, False], replies
    assert all(r["error"]["code"] == "bad_request" and "`cmid`" in r["error"]["message"] for r in replies[1:])
    assert [e["text"] for e in await messages_of(bob, 1)] == ["before"]
    again = await alice.call("send", to=bob.id, text="before, again", cmid="a")
    assert again["id"] == replies[0]["id"]


async def test_a_text_with_nul_is_refused_and_fails_no_other_message(chat: Chat) -> None:
    """U+0000 cannot be stored by PostgreSQL, so every node refuses it in `text` with bad_request
    naming the field; the messages pipelined around it are stored and delivered."""
    alice, bob = await chat.users("alice", "bob")
    await make_friends(alice, bob)
    texts = ["before", "nul \u0000 inside", "after"]
    replies = await pipeline(alice.client, [{"op": "send", "to": bob.id, "text": t} for t in texts])
    assert [r["ok"] for r in replies] == [True, False, True], replies
    assert replies[1]["error"]["code"] == "bad_request" and "`text`" in replies[1]["error"]["message"]
    assert [e["text"] for e in await messages_of(bob, 2)] == ["before", "after"]
    assert [m["text"] for m in (await bob.call("history", **{"with": alice.id}))["messages"]] == ["before", "after"]
