"""WebSocket at /ws: one JSON object per text message, otherwise the same as TCP.

Frames are written straight into the connection's sans-I/O protocol and its transport,
as on TCP, so the only outgoing buffer is the socket's and a session can write
without awaiting. (`send_data` is websockets' own method that flushes the protocol.)
"""

from __future__ import annotations

import contextlib
import http
import logging
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from clusterchat.errors import FrameTooLarge
from clusterchat.protocol.codec import error_event
from clusterchat.session import Session

if TYPE_CHECKING:
    from clusterchat.node import ChatNode

log = logging.getLogger(__name__)


class WebSocketOutlet:
    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        peer = ws.remote_address
        self.peer = f"ws:{peer[0]}:{peer[1]}" if peer else "ws:?"

    def write(self, data: bytes) -> None:
        ws = self._ws
        if ws.protocol.state is not State.OPEN or ws.transport.is_closing():
            return
        try:
            ws.protocol.send_text(data[:-1] if data.endswith(b"\n") else data)
        except InvalidState:
            return
        ws.send_data()

    def buffered(self) -> int:
        return self._ws.transport.get_write_buffer_size()

    def close(self) -> None:
        ws = self._ws
        if ws.protocol.state is State.OPEN:
            with contextlib.suppress(InvalidState):
                ws.protocol.send_close(CloseCode.NORMAL_CLOSURE)
            ws.send_data()

    def abort(self) -> None:
        self._ws.transport.abort()

    def pause_reading(self) -> None:
        self._ws.transport.pause_reading()

    def resume_reading(self) -> None:
        self._ws.transport.resume_reading()

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, ConnectionClosed):
            await self._ws.drain()  # websockets' flow control: returns once the transport resumes


class ChatWebSocket(ServerConnection):
    """Sends `frame_too_large` before websockets closes with 1009 for an oversized message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        protocol = self.protocol
        original_fail = protocol.fail

        def fail(code: CloseCode | int, reason: str = "") -> None:
            if code == CloseCode.MESSAGE_TOO_BIG and protocol.state is State.OPEN:
                protocol.send_text(error_event(FrameTooLarge("the message is over the frame limit"))[:-1])
            original_fail(code, reason)

        protocol.fail = fail  # type: ignore[method-assign]


async def start_websocket(node: ChatNode, host: str, port: int) -> Server:
    max_frame = node.config.max_frame

    def process_request(_conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/ws":
            return _conn.respond(http.HTTPStatus.NOT_FOUND, "not found: the WebSocket endpoint is /ws\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        session = Session(node, WebSocketOutlet(ws))
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
                session.on_frames([message])
                if session.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            session.on_connection_lost()

    return await serve(
        handler, host, port, process_request=process_request, create_connection=ChatWebSocket,
        max_size=max(4 * max_frame, 1 << 20), ping_interval=None, compression=None,
    )
