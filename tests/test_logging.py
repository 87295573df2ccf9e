"""Logs: one line per notable event, and never a password, a token or message text."""

from __future__ import annotations

import pytest

from clusterchat.client import ChatClient
from support.node import NodeProcess

SECRET_PASSWORD = "hunter2-do-not-log"
SECRET_TEXT = "the launch code is 0000-do-not-log"


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_the_log_has_events_but_no_secrets(node: NodeProcess) -> None:
    async with await ChatClient.connect(node.host, node.port) as a, \
            await ChatClient.connect(node.host, node.port) as b:
        await a.call("register", name="alice", password=SECRET_PASSWORD)
        await b.call("register", name="bob", password=SECRET_PASSWORD)
        la = await a.call("login", name="alice", password=SECRET_PASSWORD)
        lb = await b.call("login", name="bob", password=SECRET_PASSWORD)
        wrong = await a.request("login", name="bob", password=SECRET_PASSWORD + "x")
        assert wrong["error"]["code"] == "already_logged_in"
        await a.call("friend_request", user_id=lb["user"]["id"])
        await b.call("friend_accept", user_id=la["user"]["id"])
        await a.call("send", to=lb["user"]["id"], text=SECRET_TEXT)
        await b.next_event("message")
        await a.send_raw(b'{"op":"send","to":"' + SECRET_TEXT.encode() + b'"}\n')  # a bad request
        assert (await a.events.get())["event"] in ("friend_added", "presence")
        async with await ChatClient.connect(node.host, node.port) as c:
            token_login = await c.request("login", token=la["token"])  # kicks alice's first session
            assert token_login["ok"]
            await c.call("logout")
    assert node.terminate() == 0
    log = node.log_text
    assert "logged in" in log and "logged out" in log  # notable events are there
    for secret in (SECRET_PASSWORD, SECRET_TEXT, la["token"], lb["token"]):
        assert secret not in log
