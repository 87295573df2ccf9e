"""Groups (PROTOCOL.md section 4, Groups; `group_member` events), over real sockets on every database."""

from __future__ import annotations

from typing import Any

from support.users import Chat, User, assert_error, by_id, quiet

MISSING_ID = 987_654_321


def member(user: User, role: str, online: bool = True) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "role": role, "online": online}


def normalized(group: dict[str, Any]) -> dict[str, Any]:
    """A group with its members in id order (the protocol does not fix their order)."""
    return {**group, "members": by_id(group["members"])}


async def test_create_group(chat: Chat) -> None:
    alice = await chat.user("alice")
    reply = await alice.call("create_group", name="team", desc="the team ✓")
    assert set(reply) == {"op", "rid", "ok", "group"}
    group = reply["group"]
    assert isinstance(group["id"], int) and 1 <= group["id"] < 2**53
    assert group == {"id": group["id"], "name": "team", "desc": "the team ✓", "role": "creator",
                     "members": [member(alice, "creator")]}
    plain = (await alice.call("create_group", name="team"))["group"]  # names need not be unique
    assert plain["id"] != group["id"] and plain["desc"] == "" and plain["role"] == "creator"
    assert by_id((await alice.call("groups"))["groups"]) == by_id([group, plain])

    assert_error(await alice.request("create_group", name=""), "bad_request", "name")
    assert_error(await alice.request("create_group", name="two words"), "bad_request", "name")
    assert_error(await alice.request("create_group", name="g" * 33), "bad_request", "name")
    assert_error(await alice.request("create_group"), "bad_request", "name")
    assert_error(await alice.request("create_group", name="ok", desc="d" * 257), "bad_request", "desc")
    assert (await alice.call("create_group", name="g" * 32, desc="d" * 256))["group"]["desc"] == "d" * 256
    assert len((await alice.call("groups"))["groups"]) == 3  # the refused ones made nothing


async def test_join_and_leave_notify_the_other_members(chat: Chat) -> None:
    alice, bob, carol, dave = await chat.users("alice", "bob", "carol", "dave")
    group = (await alice.call("create_group", name="team"))["group"]
    gid = group["id"]

    joined = await bob.call("join_group", group_id=gid)
    assert set(joined) == {"op", "rid", "ok", "group"}
    assert normalized(joined["group"]) == normalized({
        "id": gid, "name": "team", "desc": "", "role": "member",
        "members": [member(alice, "creator"), member(bob, "member")]})
    assert await alice.event("group_member") == {"event": "group_member", "group_id": gid,
                                                  "user": bob.ref, "joined": True}
    assert await quiet(bob.client) == []  # not told of its own join

    await carol.call("join_group", group_id=gid)
    for other in (alice, bob):
        ev = await other.event("group_member")
        assert ev == {"event": "group_member", "group_id": gid, "user": carol.ref, "joined": True}
    assert await quiet(carol.client) == []
    assert await quiet(dave.client) == []  # not a member: hears nothing

    # Joining again changes nothing and tells nobody.
    again = await bob.call("join_group", group_id=gid)
    assert len(again["group"]["members"]) == 3 and again["group"]["role"] == "member"
    assert await quiet(alice.client) == [] and await quiet(carol.client) == []

    reply = await bob.call("leave_group", group_id=gid)
    assert set(reply) == {"op", "rid", "ok"}
    for other in (alice, carol):
        ev = await other.event("group_member")
        assert ev == {"event": "group_member", "group_id": gid, "user": bob.ref, "joined": False}
    assert await quiet(bob.client) == []

    # Bob is out: no sends, no history, no second leave, no longer in his groups.
    assert_error(await bob.request("group_send", group_id=gid, text="hi?"), "not_member")
    assert_error(await bob.request("history", group_id=gid), "not_member")
    assert_error(await bob.request("leave_group", group_id=gid), "not_member")
    assert (await bob.call("groups"))["groups"] == []
    assert_error(await dave.request("leave_group", group_id=gid), "not_member")
    assert_error(await dave.request("group_send", group_id=gid, text="hi?"), "not_member")
    # ... and gets no group messages any more.
    await carol.call("group_send", group_id=gid, text="bob is gone")
    assert (await alice.event("message"))["text"] == "bob is gone"
    assert await quiet(bob.client) == []
    assert normalized((await alice.call("groups"))["groups"][0]) == normalized({
        "id": gid, "name": "team", "desc": "", "role": "creator",
        "members": [member(alice, "creator"), member(carol, "member")]})

    # He may join again and is a member like before.
    await bob.call("join_group", group_id=gid)
    await bob.call("group_send", group_id=gid, text="back")
    assert (await carol.event("message"))["text"] == "back"


async def test_no_such_group(chat: Chat) -> None:
    alice = await chat.user("alice")
    for op, fields in [("join_group", {}), ("leave_group", {}), ("group_send", {"text": "hi"}),
                       ("history", {})]:
        reply = await alice.request(op, group_id=MISSING_ID, **fields)
        assert_error(reply, "no_such_group")
    assert_error(await alice.request("join_group", group_id="1"), "bad_request", "group_id")
    assert_error(await alice.request("join_group", group_id=0), "bad_request", "group_id")
    assert_error(await alice.request("join_group"), "bad_request", "group_id")
    assert (await alice.call("groups"))["groups"] == []


async def test_groups_in_login_reply_with_members_and_online_flags(chat: Chat) -> None:
    alice, bob, carol = await chat.users("alice", "bob", "carol")
    team = (await alice.call("create_group", name="team", desc="work"))["group"]
    club = (await bob.call("create_group", name="club"))["group"]
    await bob.call("join_group", group_id=team["id"])
    await carol.call("join_group", group_id=team["id"])
    await carol.client.close()
    await bob.call("logout")

    # Bob logs in again: both groups, his role in each, every member with its online flag.
    bob = await chat.login("bob")
    groups = by_id(bob.login["groups"])
    assert [normalized(g) for g in groups] == [
        normalized({"id": team["id"], "name": "team", "desc": "work", "role": "member",
                    "members": [member(alice, "creator"), member(bob, "member"), member(carol, "member", False)]}),
        {"id": club["id"], "name": "club", "desc": "", "role": "creator", "members": [member(bob, "creator")]},
    ]
    assert by_id((await bob.call("groups"))["groups"]) == groups
    # Alice sees the same members and flags; she is in one group only.
    [alice_team] = (await alice.call("groups"))["groups"]
    assert normalized(alice_team) == normalized({**groups[0], "role": "creator"})
    # Carol, offline when the others acted, still has the group at her next login.
    carol = await chat.login("carol")
    assert [g["id"] for g in carol.login["groups"]] == [team["id"]]
    assert carol.login["groups"][0]["role"] == "member"
    assert all(m["online"] for m in carol.login["groups"][0]["members"])
