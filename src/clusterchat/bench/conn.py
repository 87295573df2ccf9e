"""Lean client connections for the load generator: one asyncio Protocol per user, TCP or WebSocket.

This module owns the wire side of `clusterchat bench`: connecting (with a source address
of its own when asked), the minimal WebSocket handshake and framing, splitting and
decoding server frames, and a small request/reply helper for the setup phase
(register, login, friends). It deliberately avoids the high-level `ChatClient`: no task
per connection, no queues, no per-frame awaits.

A connection has two modes:

* setup (default): frames are decoded to dicts; replies resolve the futures of
  `request()`, events go to `on_setup_event()`.
* load (`start_load()`): frames are decoded to the small `Frame` struct, which reads only
  the fields the bench needs, and the whole batch of one read goes to `on_load_frames()`
  (a subclass's hot path), which writes whatever it answers with one `send_frames()`.

Client WebSocket frames are masked with an all-zero key (RFC 6455 requires a mask, not a
random one from a load generator), so framing is a header in front of the JSON bytes.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import os
import resource
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import msgspec

_encode = msgspec.json.Encoder().encode
_monotonic = time.monotonic
_generic = msgspec.json.Decoder()


class ErrorBody(msgspec.Struct):
    code: str = "?"
    message: str = ""


class Frame(msgspec.Struct):
    """The fields of a server frame the load phase reads; the rest is skipped by the decoder."""

    op: str | None = None
    rid: int | str | None = None
    ok: bool | None = None
    event: str | None = None
    seq: int | None = None
    text: str | None = None
    error: ErrorBody | None = None


_typed = msgspec.json.Decoder(Frame)
decode_frames_typed: Callable[[bytes], list[Frame]] = _typed.decode_lines
decode_frames_generic: Callable[[bytes], list[Any]] = _generic.decode_lines


class RequestFailed(Exception):
    """A setup request got an error reply."""

    def __init__(self, op: str, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        self.op = op
        self.code: str = error.get("code", "?")
        self.reply = reply
        super().__init__(f"{op}: {self.code}: {error.get('message', '')}")


class ConnectionLost(Exception):
    pass


# ---------------------------------------------------------------------------- WebSocket framing


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame (FIN set), masked with the zero key."""
    n = len(payload)
    head = 0x80 | opcode
    if n < 126:
        return bytes((head, 0x80 | n)) + b"\0\0\0\0" + payload
    if n < 65536:
        return bytes((head, 0xFE)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload
    return bytes((head, 0xFF)) + n.to_bytes(8, "big") + b"\0\0\0\0" + payload


# ---------------------------------------------------------------------------- the connection


class BenchConn(asyncio.Protocol):
    """One user's connection. Subclasses override `on_load_frames` (and maybe the event hooks)."""

    __slots__ = (
        "_closed_fut", "_frag", "_handshake", "_rids", "_tail", "_typed", "_waiters", "_ws", "_ws_key",
        "closed", "index", "last_write", "transport",
    )  # fmt: skip

    def __init__(self, index: int, websocket: bool = False) -> None:
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_write = 0.0
        self._tail = b""
        self._typed = False
        self._waiters: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._rids = itertools.count(1)
        self._ws = websocket
        self._ws_key = ""
        self._handshake: asyncio.Future[None] | None = None
        self._frag = b""
        self._closed_fut: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_write = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for _op, fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(f"connection {self.index} closed"))
        self._waiters.clear()
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionLost("closed during the WebSocket handshake"))
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        self.on_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ws:
            if self._handshake is not None:
                data = self._handshake_data(data)
                if not data:
                    return
            payloads = self._ws_feed(data)
            if not payloads:
                return
            chunk = b"\n".join(payloads) + b"\n"
        else:
            if self._tail:
                data = self._tail + data
            end = data.rfind(b"\n")
            if end < 0:
                self._tail = data
                return
            end += 1
            if end == len(data):
                self._tail = b""
                chunk = data
            else:
                self._tail = data[end:]
                chunk = data[:end]
        if self._typed:
            self.on_load_frames(decode_frames_typed(chunk))
        else:
            for msg in decode_frames_generic(chunk):
                self._on_setup_frame(msg)

    # ---- hooks -------------------------------------------------------------------

    def on_load_frames(self, frames: list[Frame]) -> None:
        """The load phase's hot path: every frame of one read."""

    def on_setup_event(self, msg: dict[str, Any]) -> None:
        """An event during setup (friend_request, presence, message...)."""

    def on_stray_reply(self, msg: dict[str, Any]) -> None:
        """A reply during setup that no `request()` waits for."""

    def on_lost(self, exc: Exception | None) -> None:
        """The connection closed."""

    # ---- output ------------------------------------------------------------------

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Write JSON frames (without newlines) in one write."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.last_write = _monotonic()
        if self._ws:
            transport.write(b"".join([ws_frame(f) for f in frames]))
        elif len(frames) == 1:
            transport.write(frames[0] + b"\n")
        else:
            transport.write(b"\n".join(frames) + b"\n")

    def send_frame(self, frame: bytes) -> None:
        self.send_frames((frame,))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self._ws:
                self.transport.write(ws_frame(b"\x03\xe8", 0x8))
            self.transport.close()

    async def aclose(self, wait_s: float = 2.0) -> None:
        if self.closed or self.transport is None:
            return
        self._closed_fut = asyncio.get_running_loop().create_future()
        self.close()
        try:
            await asyncio.wait_for(self._closed_fut, wait_s)
        except TimeoutError:
            self.transport.abort()

    # ---- setup requests ----------------------------------------------------------

    def start_load(self) -> None:
        """Switch to typed decoding and `on_load_frames`; no `request()` may be pending."""
        self._typed = True

    async def request(self, op: str, wait_s: float = 120.0, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (raises RequestFailed on `ok: false`)."""
        reply = await self.raw_request(op, wait_s=wait_s, **fields)
        if not reply.get("ok"):
            raise RequestFailed(op, reply)
        return reply

    async def raw_request(self, op: str, wait_s: float = 120.0, **fields: Any) -> dict[str, Any]:
        if self.closed or self.transport is None:
            raise ConnectionLost(f"connection {self.index} is closed")
        rid = next(self._rids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = (op, fut)
        self.send_frame(_encode({"op": op, "rid": rid, **fields}))
        try:
            return await asyncio.wait_for(fut, wait_s)
        finally:
            self._waiters.pop(rid, None)

    def ping(self) -> None:
        """A fire-and-forget ping (keeps an idle connection within the node's idle timeout)."""
        self.send_frame(b'{"op":"ping"}')

    def _on_setup_frame(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if "event" in msg:
            self.on_setup_event(msg)
            return
        rid = msg.get("rid")
        waiter = self._waiters.pop(rid, None) if isinstance(rid, int) else None
        if waiter is None:
            self.on_stray_reply(msg)
            return
        fut = waiter[1]
        if not fut.done():
            fut.set_result(msg)

    # ---- WebSocket -------------------------------------------------------------------

    def start_handshake(self, host: str, port: int, path: str = "/ws") -> asyncio.Future[None]:
        assert self.transport is not None
        self._ws_key = base64.b64encode(os.urandom(16)).decode()
        self._handshake = asyncio.get_running_loop().create_future()
        self.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._ws_key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return self._handshake

    def _handshake_data(self, data: bytes) -> bytes:
        assert self._handshake is not None
        data = self._tail + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self._tail = data
            return b""
        head, rest = data[:end], data[end + 4:]
        self._tail = b""
        fut, self._handshake = self._handshake, None
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            fut.set_exception(ConnectionLost(f"WebSocket handshake refused: {status.decode(errors='replace')}"))
            if self.transport is not None:
                self.transport.close()
            return b""
        fut.set_result(None)
        return rest

    def _ws_feed(self, data: bytes) -> list[bytes]:
        buf = self._tail + data if self._tail else data
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if n - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == 0x1 or opcode == 0x2:
                if fin:
                    out.append(payload)
                else:
                    self._frag = payload
            elif opcode == 0x0:
                self._frag += payload
                if fin:
                    out.append(self._frag)
                    self._frag = b""
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(ws_frame(payload, 0xA))
            elif opcode == 0x8 and self.transport is not None:
                self.transport.close()
                break
        self._tail = buf[pos:]
        return out


# ---------------------------------------------------------------------------- connecting

C = TypeVar("C", bound=BenchConn)


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def source_address(i: int, total: int, host: str, per_source: int) -> str | None:
    """The local address for the i-th connection: 127.0.0.1, .2, ... every `per_source` connections.

    One source address has about 28,000 ephemeral ports towards one target; past `per_source`
    connections to a loopback target each block of `per_source` gets its own address.
    Otherwise (fewer, or a remote target) the kernel picks.
    """
    if per_source <= 0 or total <= per_source:
        return None
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host != "localhost":
            return None
    return f"127.0.0.{1 + i // per_source}"


async def connect(factory: Callable[[], C], host: str, port: int, *, websocket: bool = False,
                  local_addr: str | None = None, wait_s: float = 30.0) -> C:
    loop = asyncio.get_running_loop()
    _transport, conn = await asyncio.wait_for(
        loop.create_connection(factory, host, port, local_addr=(local_addr, 0) if local_addr else None), wait_s
    )
    if websocket:
        await asyncio.wait_for(conn.start_handshake(host, port), wait_s)
    return conn


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run coroutines with at most `limit` at once; results (or exceptions) in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def register_names(targets: Sequence[tuple[str, int]], names: Sequence[str], password: str, *,
                         websocket: bool = False, pool: int = 50, warm_login: bool = True) -> tuple[int, int]:
    """Register `names` over a small pool of connections spread over `targets`; (new, already there).

    With `warm_login`, each pool connection then logs one of them in before it closes, so
    the node's one-time costs of a first login (statement caches, hashing threads) are
    paid before anything is measured.
    """
    pool_size = max(1, min(pool, len(names)))
    created = existing = 0

    async def worker(k: int) -> None:
        nonlocal created, existing
        host, port = targets[k % len(targets)]
        conn = await connect(lambda: BenchConn(k, websocket), host, port, websocket=websocket)
        try:
            for name in names[k::pool_size]:
                reply = await conn.raw_request("register", name=name, password=password)
                if reply.get("ok"):
                    created += 1
                elif (reply.get("error") or {}).get("code") == "name_taken":
                    existing += 1
                else:
                    raise RequestFailed("register", reply)
            if warm_login:
                await conn.request("login", name=names[k], password=password)
        finally:
            await conn.aclose()

    results = await asyncio.gather(*(worker(k) for k in range(pool_size)), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return created, existing


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


async def keepalive(conns: Collection[BenchConn], interval: float = 30.0,
                    stop: asyncio.Event | None = None) -> None:
    """Ping every connection that wrote nothing for `interval` seconds (checked every second).

    `conns` may change while this runs (it is read afresh each second; a dict's `values()` will do).
    """
    period = min(1.0, interval / 2)
    while stop is None or not stop.is_set():
        await asyncio.sleep(period)
        cutoff = time.monotonic() - interval
        for c in conns:
            if not c.closed and c.last_write < cutoff and c.transport is not None:
                c.ping()
