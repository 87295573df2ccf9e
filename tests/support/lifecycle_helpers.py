"""Helpers for the lifecycle, session and hostile-input tests (real sockets, real nodes).

* `Raw`: a bare TCP connection that speaks bytes, so tests can send anything and read
  exactly what the node wrote, frame by frame.
* `RawWs`: the same over WebSocket (text or binary messages).
* `User`: a logged-in `ChatClient` with its id and name; `new_user`/`befriend`/`friends_pair`
  build the usual fixtures of a chat.
* small assertions about the node process (`assert_alive`, `node_rss`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from clusterchat.client import ChatClient
from support.node import NodeProcess

PASSWORD = "secret123"
_names = itertools.count(1)


def unique_name(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def frame(**fields: Any) -> bytes:
    """One JSON-lines frame."""
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------- raw TCP


class _FrameConnection:
    """What the raw connections share: a request is one frame out, then the next reply in."""

    async def read(self, within: float = 10) -> dict[str, Any]:
        """The next frame; raises EOFError when the node closed the connection."""
        raise NotImplementedError

    async def send_request(self, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    async def request(self, within: float = 10, **fields: Any) -> dict[str, Any]:
        """Send one request and return the next frame that is not an event."""
        await self.send_request(fields)
        while True:
            msg = await self.read(within)
            if "event" not in msg:
                return msg

    async def read_until_closed(self, within: float) -> list[dict[str, Any]]:
        """Every frame until EOF; fails (TimeoutError) if the node keeps it open past `within` seconds."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + within
        while True:
            try:
                frames.append(await self.read(max(0.01, deadline - time.monotonic())))
            except (EOFError, ConnectionResetError):
                return frames


class Raw(_FrameConnection):
    """A bare TCP connection: write any bytes, read the node's frames one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, node: NodeProcess, *, rcvbuf: int | None = None) -> Raw:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection(node.host, node.port, limit=1 << 24)
            return cls(reader, writer)
        # SO_RCVBUF must be set before connect() to bound the advertised window.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (node.host, node.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_request(self, fields: dict[str, Any]) -> None:
        await self.send(frame(**fields))

    async def read(self, within: float = 10) -> dict[str, Any]:
        """The next frame; raises EOFError when the node closed the connection."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), within)
            if not line:
                raise EOFError("the node closed the connection")
            if line.strip():
                msg: dict[str, Any] = json.loads(line)
                return msg

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Frames that arrive within `seconds` (the connection must stay open)."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frames.append(await self.read(left))
            except TimeoutError:
                break
        return frames

    async def ping_ok(self, rid: Any = "alive") -> None:
        reply = await self.request(op="ping", rid=rid)
        assert reply == {"op": "ping", "rid": rid, "ok": True, "ts": reply.get("ts")}, reply
        assert isinstance(reply["ts"], int)

    def abort(self) -> None:
        """Close abruptly: RST, no goodbye."""
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class BareSocket(_FrameConnection):
    """A TCP socket the event loop never reads on its own: data is only read when asked.

    Unlike `Raw` (whose StreamReader pulls everything the node sends into memory), this is
    a client that really stops reading: once it stops calling `read`, the kernel buffers
    fill up and the node's writes back up. `rcvbuf` shrinks the kernel's share of that.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, node: NodeProcess, *, rcvbuf: int = 4096) -> BareSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: bounds the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (node.host, node.port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def send_request(self, fields: dict[str, Any]) -> None:
        await self.send(frame(**fields))

    async def read(self, within: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while b"\n" not in self._buf:
            chunk = await asyncio.wait_for(self._loop.sock_recv(self.sock, 65536),
                                           max(0.01, deadline - time.monotonic()))
            if not chunk:
                raise EOFError("the node closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- raw WebSocket


class RawWs(_FrameConnection):
    """A bare WebSocket connection to /ws."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, node: NodeProcess) -> RawWs:
        ws = await ws_connect(f"ws://{node.host}:{node.ws_port}/ws", max_size=None, compression=None,
                              ping_interval=None)
        return cls(ws)

    async def send_text(self, text: str) -> None:
        await self.ws.send(text, text=True)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.send(data, text=False)

    async def send_request(self, fields: dict[str, Any]) -> None:
        await self.send_text(json.dumps(fields))

    async def read(self, within: float = 10) -> dict[str, Any]:
        """The next message as JSON; raises EOFError when the node closed the connection."""
        try:
            message = await asyncio.wait_for(self.ws.recv(), within)
        except WsClosed as exc:
            raise EOFError("the node closed the connection") from exc
        msg: dict[str, Any] = json.loads(message)
        return msg

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


# --------------------------------------------------------------------------- users


@dataclass
class User:
    client: ChatClient
    id: int
    name: str
    login: dict[str, Any] = field(default_factory=dict)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.client.call(op, **fields)


async def connect(node: NodeProcess, *, websocket: bool = False) -> ChatClient:
    port = node.ws_port if websocket else node.port
    return await ChatClient.connect(node.host, port, websocket=websocket)


async def new_user(node: NodeProcess, prefix: str = "u", *, websocket: bool = False,
                   name: str | None = None) -> User:
    """Register a fresh user and log it in on a new connection."""
    client = await connect(node, websocket=websocket)
    name = name or unique_name(prefix)
    await client.call("register", name=name, password=PASSWORD)
    login = await client.call("login", name=name, password=PASSWORD)
    return User(client, login["user"]["id"], name, login)


async def login(node: NodeProcess, name: str, *, websocket: bool = False, token: str | None = None) -> User:
    """Log an existing user in on a new connection (with its password, or `token`)."""
    client = await connect(node, websocket=websocket)
    creds: dict[str, Any] = {"token": token} if token is not None else {"name": name, "password": PASSWORD}
    reply = await client.call("login", **creds)
    return User(client, reply["user"]["id"], name, reply)


async def befriend(a: User, b: User) -> None:
    await a.call("friend_request", user_id=b.id)
    await b.client.next_event("friend_request")
    await b.call("friend_accept", user_id=a.id)
    await a.client.next_event("friend_added")


def abort_client(client: ChatClient) -> None:
    """Drop a ChatClient's connection abruptly (no logout, no close handshake)."""
    if client._ws is not None:
        transport = client._ws.transport
    else:
        assert client._writer is not None
        transport = client._writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def close_all(clients: Iterable[ChatClient | User | Raw | RawWs | BareSocket]) -> None:
    for c in clients:
        if isinstance(c, User):
            await c.client.close()
        else:
            await c.close()


def drain_events(client: ChatClient) -> list[dict[str, Any]]:
    """The events queued so far (without waiting)."""
    events = []
    while not client.events.empty():
        events.append(client.events.get_nowait())
    return events


async def fetch_inbox(user: User) -> list[dict[str, Any]]:
    """Every message of the user's inbox: the login's `offline`, then `sync` pages while `more`."""
    messages = list(user.login["offline"])
    more = user.login["more"]
    after = messages[-1]["seq"] if messages else 0
    while more:
        page = await user.call("sync", after=after, limit=100)
        messages.extend(page["messages"])
        more = page["more"]
        if page["messages"]:
            after = page["messages"][-1]["seq"]
    return messages


# --------------------------------------------------------------------------- waiting


async def wait_closed(client: ChatClient, within: float) -> float:
    """Seconds until the client's connection closes; fails after `within` seconds."""
    start = time.monotonic()
    await asyncio.wait_for(client.closed.wait(), within)
    return time.monotonic() - start


# --------------------------------------------------------------------------- the node process


def assert_alive(node: NodeProcess) -> None:
    assert node.proc is not None and node.proc.poll() is None, (
        f"the node died (exit {node.proc.returncode if node.proc else None}):\n{node.log_tail()}"
    )


def node_rss(node: NodeProcess) -> int:
    """Resident memory of the node process, in bytes."""
    return int(psutil.Process(node.pid).memory_info().rss)


async def assert_serving(node: NodeProcess) -> None:
    """The node is alive and answers a fresh connection."""
    assert_alive(node)
    raw = await Raw.connect(node)
    try:
        await raw.ping_ok()
    finally:
        await raw.close()
