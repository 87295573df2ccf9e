"""An asyncio client for the clusterchat protocol, over TCP (JSON lines) or WebSocket.

    client = await ChatClient.connect("127.0.0.1", 7000)
    await client.call("login", name="alice", password="secret123")
    await client.call("send", to=2, text="hi")
    event = await client.next_event()

`request` returns the raw reply; `call` returns it when ok and raises `ReplyError`
otherwise. Events arrive on `events` (an asyncio.Queue of dicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class ReplyError(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        self.reply = reply
        self.code: str = error.get("code", "?")
        self.error: dict[str, Any] = error
        super().__init__(f"{self.code}: {error.get('message', '')}")


class ConnectionClosed(Exception):
    pass


class ChatClient:
    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._anonymous: deque[asyncio.Future[dict[str, Any]]] = deque()
        self._rids = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ws: Any = None

    @classmethod
    async def connect(cls, host: str, port: int, *, websocket: bool = False, path: str = "/ws",
                      local_addr: str | None = None, timeout: float = 10) -> ChatClient:
        self = cls()
        if websocket:
            from websockets.asyncio.client import connect

            self._ws = await asyncio.wait_for(
                connect(f"ws://{host}:{port}{path}", max_size=None, compression=None, ping_interval=None), timeout
            )
        else:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 24,
                                        local_addr=(local_addr, 0) if local_addr else None), timeout
            )
        self._reader_task = asyncio.create_task(self._read_loop())
        return self

    async def _lines(self):  # type: ignore[no-untyped-def]
        if self._ws is not None:
            async for message in self._ws:
                yield message
        else:
            assert self._reader is not None
            while line := await self._reader.readline():
                yield line

    async def _read_loop(self) -> None:
        try:
            async for line in self._lines():
                if not line.strip():
                    continue
                self.handle(_decode(line))
        except Exception:
            pass
        finally:
            self.closed.set()
            for fut in itertools.chain(self._pending.values(), self._anonymous):
                if not fut.done():
                    fut.set_exception(ConnectionClosed("connection closed"))
            self._pending.clear()
            self._anonymous.clear()

    def handle(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            self.events.put_nowait(msg)
            return
        rid = msg.get("rid")
        fut = self._pending.pop(rid, None) if rid is not None else None
        if fut is None and self._anonymous:
            fut = self._anonymous.popleft()
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def send_raw(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if self._ws is not None:
            await self._ws.send(data.rstrip(b"\n"), text=True)
        else:
            assert self._writer is not None
            self._writer.write(data)
            await self._writer.drain()

    def expect_reply(self, rid: Any = None) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if rid is None:
            self._anonymous.append(fut)
        else:
            self._pending[rid] = fut
        return fut

    async def request(self, op: str, *, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        if self.closed.is_set():
            raise ConnectionClosed("connection closed")
        rid = next(self._rids)
        fut = self.expect_reply(rid)
        await self.send_raw(_encode({"op": op, "rid": rid, **fields}) + b"\n")
        return await asyncio.wait_for(fut, timeout)

    async def call(self, op: str, *, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        reply = await self.request(op, timeout=timeout, **fields)
        if not reply.get("ok"):
            raise ReplyError(reply)
        return reply

    async def next_event(self, kind: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next event (of `kind`, skipping others)."""
        async def wait() -> dict[str, Any]:
            while True:
                ev = await self.events.get()
                if kind is None or ev.get("event") == kind:
                    return ev
        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader_task, 5)

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
