"""WebSocket at /ws: one JSON object per text message, otherwise the same as TCP."""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from typing import TYPE_CHECKING

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from clusterchat.errors import FrameTooLarge
from clusterchat.session import Session

if TYPE_CHECKING:
    from clusterchat.node import ChatNode

log = logging.getLogger(__name__)


class WebSocketOutlet:
    """Queues frames for one writer task, so sessions can write without awaiting."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        peer = ws.remote_address
        self.peer = f"ws:{peer[0]}:{peer[1]}" if peer else "ws:?"

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._idle.clear()
        self._wakeup.set()

    def buffered(self) -> int:
        transport = self._ws.transport
        return self._queued + (transport.get_write_buffer_size() if transport else 0)

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()

    def pause_reading(self) -> None:
        if self._ws.transport is not None:
            self._ws.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._ws.transport is not None:
            self._ws.transport.resume_reading()

    async def drain(self) -> None:
        await self._idle.wait()

    async def run_writer(self) -> None:
        ws = self._ws
        try:
            while True:
                while self._queue:
                    data = self._queue.popleft()
                    self._queued -= len(data)
                    await ws.send(data.rstrip(b"\n"), text=True)
                self._idle.set()
                if self._closing:
                    await ws.close()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        except ConnectionClosed:
            pass
        finally:
            self._idle.set()


async def start_websocket(node: ChatNode, host: str, port: int) -> Server:
    max_frame = node.config.max_frame

    def process_request(_conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/ws":
            return _conn.respond(http.HTTPStatus.NOT_FOUND, "not found: the WebSocket endpoint is /ws\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        outlet = WebSocketOutlet(ws)
        session = Session(node, outlet)
        writer = asyncio.create_task(outlet.run_writer())
        try:
            async for message in ws:
                size = len(message)
                if isinstance(message, str) and size * 4 > max_frame:
                    size = len(message.encode())
                if size > max_frame:
                    session.on_frame_too_large(FrameTooLarge(f"frame of {size} bytes is over the limit of {max_frame}"))
                    break
                if not message.strip():
                    continue  # blank messages are ignored, like blank lines on TCP
                session.on_frames([message])  # type: ignore[list-item]
                if session.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            session.on_connection_lost()
            outlet.close()
            try:
                await asyncio.wait_for(writer, 5)
            except (TimeoutError, ConnectionClosed):
                writer.cancel()

    return await serve(
        handler, host, port, process_request=process_request,
        max_size=max(4 * max_frame, 1 << 20), ping_interval=None, compression=None,
    )
