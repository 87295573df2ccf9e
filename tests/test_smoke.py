"""A first end-to-end check on every database: register, befriend, chat, group chat."""

from __future__ import annotations

from clusterchat.client import ChatClient
from support.node import NodeProcess


async def test_two_users_chat_over_tcp_and_websocket(node: NodeProcess) -> None:
    async with await ChatClient.connect(node.host, node.port) as a, \
            await ChatClient.connect(node.host, node.ws_port, websocket=True) as b:
        await a.call("register", name="alice", password="secret1")
        await b.call("register", name="bob", password="secret1")
        la = await a.call("login", name="alice", password="secret1")
        lb = await b.call("login", name="bob", password="secret1")
        await a.call("friend_request", user_id=lb["user"]["id"], note="hi")
        assert (await b.next_event("friend_request"))["from"]["name"] == "alice"
        accepted = await b.call("friend_accept", user_id=la["user"]["id"])
        assert accepted["friend"] == {"id": la["user"]["id"], "name": "alice", "online": True}
        sent = await a.call("send", to=lb["user"]["id"], text="hello bob")
        ev = await b.next_event("message")
        assert ev["id"] == sent["id"] and ev["text"] == "hello bob" and ev["seq"] == 1
        group = (await a.call("create_group", name="team"))["group"]
        await b.call("join_group", group_id=group["id"])
        await b.call("group_send", group_id=group["id"], text="hi team")
        ev = await a.next_event("message")
        assert ev["group_id"] == group["id"] and ev["from"]["name"] == "bob"
