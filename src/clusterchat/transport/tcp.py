"""TCP, JSON lines: an asyncio Protocol per connection, kept small for many idle clients."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from clusterchat.protocol.frames import FrameOverflow, LineSplitter
from clusterchat.session import Session

if TYPE_CHECKING:
    from clusterchat.node import ChatNode


class TcpConnection(asyncio.Protocol):
    __slots__ = ("_drain", "_node", "_out", "_session", "_splitter", "_transport")

    def __init__(self, node: ChatNode) -> None:
        self._node = node
        self._splitter = LineSplitter(node.config.max_frame)
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._drain: asyncio.Future[None] | None = None
        # Frames written during one turn of the loop leave in one write() at its end:
        # a reply, an event and another reply to one client cost one system call.
        self._out: list[bytes] | None = None

    @property
    def peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"tcp:{peer[0]}:{peer[1]}" if peer else "tcp:?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self._session = Session(self._node, self)

    def data_received(self, data: bytes) -> None:
        session = self._session
        assert session is not None
        try:
            frames = self._splitter.feed(data)
        except FrameOverflow as exc:
            if exc.frames:
                session.on_frames(exc.frames)
            session.on_frame_too_large(exc)
            return
        if frames:
            session.on_frames(frames)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session is not None:
            self._session.on_connection_lost()
        self._wake()

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._node.loop.create_future()

    def resume_writing(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self._drain is not None:
            if not self._drain.done():
                self._drain.set_result(None)
            self._drain = None

    # ---- Outlet ----
    def write(self, data: bytes) -> None:
        if self._out is None:
            self._out = [data]
            self._node.loop.call_soon(self._flush)
        else:
            self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        self._out = None
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain


async def start_tcp(node: ChatNode, host: str, port: int) -> asyncio.Server:
    return await node.loop.create_server(lambda: TcpConnection(node), host, port, backlog=4096, reuse_address=True)
