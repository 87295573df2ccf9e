"""Small helpers for protocol tests: users on a node, friendships, and waiting for (no) events.

    async with Chat(node) as chat:
        alice = await chat.user("alice")            # registered and logged in, over TCP
        bob = await chat.user("bob", websocket=True)
        await make_friends(alice, bob)

Every connection opened through a `Chat` is closed when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from clusterchat.client import ChatClient
from support.node import NodeProcess

PASSWORD = "secret123"


@dataclass
class User:
    """A logged-in user: its connection, id, name, password and the login reply."""

    client: ChatClient
    id: int
    name: str
    password: str = PASSWORD
    login: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.client.call(op, **fields)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.client.request(op, **fields)

    async def event(self, kind: str | None = None, within: float = 10) -> dict[str, Any]:
        """The next event (of `kind`, skipping others), waiting at most `within` seconds."""
        return await self.client.next_event(kind, within)

    async def quiet(self) -> list[dict[str, Any]]:
        return await quiet(self.client)


class Chat:
    """Connections and users on one node; closes every connection on exit."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.clients: list[ChatClient] = []

    async def connect(self, *, websocket: bool = False) -> ChatClient:
        port = self.node.ws_port if websocket else self.node.port
        client = await ChatClient.connect(self.node.host, port, websocket=websocket)
        self.clients.append(client)
        return client

    async def register(self, name: str, password: str = PASSWORD) -> int:
        """Register `name` on a throw-away connection; its user id."""
        client = await self.connect()
        try:
            reply = await client.call("register", name=name, password=password)
        finally:
            await client.close()
        user_id: int = reply["user_id"]
        return user_id

    async def login(self, name: str, password: str = PASSWORD, *, websocket: bool = False) -> User:
        """A new connection logged in as `name` (registered before)."""
        client = await self.connect(websocket=websocket)
        reply = await client.call("login", name=name, password=password)
        return User(client, reply["user"]["id"], name, password, reply)

    async def user(self, name: str, password: str = PASSWORD, *, websocket: bool = False) -> User:
        """Register `name` and log it in, on one new connection."""
        client = await self.connect(websocket=websocket)
        await client.call("register", name=name, password=password)
        reply = await client.call("login", name=name, password=password)
        return User(client, reply["user"]["id"], name, password, reply)

    async def users(self, *names: str) -> list[User]:
        return list(await asyncio.gather(*(self.user(name) for name in names)))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    async def __aenter__(self) -> Chat:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def register_and_login(node: NodeProcess, name: str, password: str = PASSWORD) -> User:
    """A standalone user (its connection is the caller's to close)."""
    client = await ChatClient.connect(node.host, node.port)
    await client.call("register", name=name, password=password)
    reply = await client.call("login", name=name, password=password)
    return User(client, reply["user"]["id"], name, password, reply)


def drain(client: ChatClient) -> list[dict[str, Any]]:
    """Every event queued on `client` now, removed from its queue."""
    events = []
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            events.append(client.events.get_nowait())
    return events


async def quiet(client: ChatClient) -> list[dict[str, Any]]:
    """The events that reached `client` before a ping's reply (so before anything the server did
    before that ping was answered), drained."""
    await client.call("ping")
    return drain(client)


async def make_friends(a: User, b: User) -> None:
    """`a` asks, `b` accepts; the friend_request and friend_added events are consumed."""
    await a.call("friend_request", user_id=b.id)
    await b.event("friend_request")
    await b.call("friend_accept", user_id=a.id)
    await a.event("friend_added")


async def events_of(user: User, kind: str, count: int, within: float = 10) -> list[dict[str, Any]]:
    """The next `count` events of `kind` (others are skipped), each within `within` seconds."""
    return [await user.event(kind, within) for _ in range(count)]


def assert_error(reply: dict[str, Any], code: str, field: str | None = None) -> None:
    """`reply` failed with `code`, and its message names `field` when given."""
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    if field is not None:
        assert field in reply["error"]["message"], reply


def by_id(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: item["id"])


def close_to_now(ts: int) -> bool:
    return abs(ts - time.time() * 1000) < 5000
