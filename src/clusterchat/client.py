"""Asyncio clients for the clusterchat protocol (PROTOCOL.md), over TCP (JSON lines) or WebSocket.

`Client` is the library for applications: one coroutine per op, an async iterator of events,
batched automatic acks, deduplication, and reconnection that loses and repeats no message::

    import asyncio
    from clusterchat.client import Client, ReplyError

    async def main() -> None:
        async with Client("127.0.0.1", 7000) as client:
            await client.login("alice", "secret123")
            bob = (await client.lookup("bob"))["user"]
            try:
                await client.send(bob["id"], "hi bob")     # ok only once it is stored
            except ReplyError as exc:
                print("not sent:", exc.code)              # e.g. not_friends
            async for event in client:                    # offline messages first, then live ones
                if event["event"] == "message":
                    print(event["from"]["name"], event["text"])

    asyncio.run(main())

`ChatClient` is the thin low-level connection underneath (used by the tests): `request` returns
the raw reply, `call` returns it when ok and raises `ReplyError` otherwise, and events arrive on
`events` (an asyncio.Queue of dicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

__all__ = ["ChatClient", "Client", "ConnectionClosed", "ReplyError"]

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

Reply = dict[str, Any]
Event = dict[str, Any]


class ReplyError(Exception):
    """An error reply. `code` is the protocol's error code, `message` its sentence for a person,
    `error` the whole error object (a `wrong_node` error also has `host`, `port`, `ws_url`) and
    `reply` the whole reply."""

    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        self.reply = reply
        self.code: str = error.get("code", "?")
        self.message: str = error.get("message", "")
        self.error: dict[str, Any] = error
        super().__init__(f"{self.code}: {self.message}")


class ConnectionClosed(Exception):
    """The connection is closed (or was lost) and the request cannot be carried out on it."""


# --------------------------------------------------------------------------- low level


class ChatClient:
    """One connection, no reconnection: requests matched by `rid`, events on `events`."""

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
        await self._open(host, port, websocket=websocket, path=path, local_addr=local_addr, timeout=timeout)
        return self

    async def _open(self, host: str, port: int, *, websocket: bool = False, path: str = "/ws",
                    local_addr: str | None = None, timeout: float = 10) -> None:
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
        try:
            await self.send_raw(_encode({"op": op, "rid": rid, **fields}) + b"\n")
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

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

    def abort(self) -> None:
        """Drop the connection at once (no close handshake); the read loop then ends."""
        transport = self._ws.transport if self._ws is not None else (
            self._writer.transport if self._writer is not None else None)
        if transport is not None:
            transport.abort()

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


class _Connection(ChatClient):
    """A `ChatClient` whose frames and end go to callbacks (its `Client`) instead of queues."""

    def __init__(self, on_frame: Callable[[_Connection, Any], None],
                 on_lost: Callable[[_Connection], None]) -> None:
        super().__init__()
        self._on_frame = on_frame
        self._on_lost = on_lost

    def handle(self, msg: dict[str, Any]) -> None:
        try:
            self._on_frame(self, msg)
        except Exception:  # a bug here must not silently kill the connection
            log.exception("could not handle a frame from the server")

    async def _read_loop(self) -> None:
        try:
            await super()._read_loop()
        finally:
            self._on_lost(self)

    async def send_frames(self, frames: list[bytes]) -> None:
        """Write frames (each ending with a newline) in order: one write on TCP, one message each
        on WebSocket."""
        if self._ws is not None:
            for frame in frames:
                await self._ws.send(frame.rstrip(b"\n"), text=True)
        else:
            assert self._writer is not None
            self._writer.write(b"".join(frames))
            await self._writer.drain()


# --------------------------------------------------------------------------- high level


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling from `first`
    up to `maximum`."""

    first: float = 0.2
    maximum: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.maximum)


class _State(enum.Enum):
    NEW = "new"  # never connected
    OPEN = "open"  # connected (logged in or not); requests go out at once
    RECONNECTING = "reconnecting"  # lost while logged in; trying again with backoff
    RESENDING = "resending"  # logged in again; re-sending the requests that were waiting
    DOWN = "down"  # lost and not coming back by itself (`connect()` may be called again)
    CLOSED = "closed"  # `close()` was called; final


class _Kind(enum.Enum):
    APP = "app"  # a request of the application
    RELOGIN = "relogin"  # the login of a reconnection
    CATCH_UP = "catch_up"  # a `sync` page of the catch-up after a login with `more`
    INTERNAL = "internal"  # acks and keepalive pings


@dataclass(eq=False)
class _Pending:
    rid: int
    op: str
    frame: bytes
    future: asyncio.Future[Reply]
    retry: bool
    kind: _Kind
    conn: _Connection | None = None  # where it was last written; None: waiting to be (re)sent


# Ops that may be sent again after a reconnect: reads, and sends made idempotent by their cmid.
_RETRYABLE: Final = frozenset({"send", "group_send", "ping", "lookup", "friends", "groups", "sync", "history"})
# Login errors that no retry can fix: the session is gone for good.
_FATAL_LOGIN_ERRORS: Final = frozenset({"bad_credentials", "bad_request"})
_REPLY_KEYS: Final = ("ok", "rid", "op")
_SEEN_IDS: Final = 10_000  # message ids remembered for deduplication
_CATCH_UP_HIGH_WATER: Final = 500  # fetch the next sync page only when the app has fewer queued
_SYNC_PAGE: Final = 100


class Client:
    """A chat client for applications; see the module docstring and README.md ("Client library").

    Requests are plain coroutines (`send`, `friends`, ... named like the ops) returning the reply
    without `ok`/`rid`/`op` and raising `ReplyError` for an error reply, `ConnectionClosed` when the
    connection is gone, `TimeoutError` after `timeout` seconds (which include waiting for a
    reconnection). Events come from `events()` (or `async for event in client`): one consumer.

    A `message` event is acknowledged once the iterator has handed it over: the acks are
    cumulative and batched (after `ack_delay` seconds or `ack_every` messages, and at `close()`).
    Messages are deduplicated by `id` (and by inbox `seq`), so a message the server delivers again
    after a reconnection is not yielded twice.
    """

    def __init__(self, host: str, port: int, *, websocket: bool = False, reconnect: bool = True,
                 ack_delay: float = 0.1, ack_every: int = 50, backoff: tuple[float, float] = (0.2, 5.0),
                 timeout: float = 10.0, ping_interval: float | None = 30.0, path: str = "/ws") -> None:
        if ack_every < 1:
            raise ValueError("ack_every must be at least 1")
        self.host = host
        self.port = port
        self.websocket = websocket
        self.path = path
        self.reconnect = reconnect
        self.ack_delay = ack_delay
        self.ack_every = ack_every
        self.backoff = Backoff(*backoff)
        self.timeout = timeout
        self.ping_interval = ping_interval  # keepalive: nodes drop connections idle for --idle-timeout
        self.user: dict[str, Any] | None = None
        self.token: str | None = None

        self._state = _State.NEW
        self._conn: _Connection | None = None
        self._inflight: dict[int, _Pending] = {}
        self._rids = itertools.count(1)
        self._kicked = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing: asyncio.Future[None] | None = None
        self._catch_up_task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()  # the established connection was lost: the supervisor acts
        self._last_write = 0.0

        # What the application gets: (inbox owner, event); None wakes iterators up.
        self._queue: asyncio.Queue[tuple[int | None, Event] | None] = asyncio.Queue()
        self._events_ended = False
        self._room = asyncio.Event()  # set when the queue is short enough to fetch more

        # The inbox of `_owner`: highest seq queued, handed out, and acknowledged by the server.
        self._owner: int | None = None
        self._last_seq = 0
        self._handed_seq = 0
        self._acked_seq = 0
        self._seen: dict[int, None] = {}
        self._catching_up = False
        self._held: list[Event] = []  # live messages that came during a catch-up
        self._unacked = 0
        self._ack_wanted = asyncio.Event()
        self._ack_full = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up (and, after a reconnection, logged in again)."""
        return self._state is _State.OPEN or self._state is _State.RESENDING

    @property
    def acked_seq(self) -> int:
        """The highest inbox seq the server confirmed as acknowledged by this client."""
        return self._acked_seq

    async def connect(self) -> None:
        """Open the connection (raises OSError or TimeoutError when the node cannot be reached)."""
        if self._state is _State.CLOSED:
            raise ConnectionClosed("the client is closed")
        if self.connected or self._state is _State.RECONNECTING:
            return
        conn = await self._open()
        if self._state is _State.CLOSED:  # closed while connecting
            await conn.close()
            raise ConnectionClosed("the client is closed")
        self._conn = conn
        self._state = _State.OPEN
        self._kicked = False
        self._events_ended = False
        if not self._started:
            self._started = True
            self._spawn(self._supervise())
            self._spawn(self._ack_loop())
            if self.ping_interval:
                self._spawn(self._keepalive(self.ping_interval))
        log.debug("connected to %s:%d", self.host, self.port)

    async def close(self) -> None:
        """Acknowledge what was handed out, close the connection, stop every task, end the events
        iterator. The session token stays valid (`logout` revokes it)."""
        if self._closing is not None:
            await asyncio.shield(self._closing)  # closed, or being closed by another caller
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._shut_down()
        finally:
            self._closing.set_result(None)
        log.debug("closed the client for %s:%d", self.host, self.port)

    async def _shut_down(self) -> None:
        if self._state is _State.OPEN and self.user is not None:
            with contextlib.suppress(ConnectionClosed, TimeoutError, ReplyError):
                await self._flush_acks()
        self._state = _State.CLOSED
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        self._fail(lambda p: True)
        if conn is not None:
            await conn.close()
        while not self._queue.empty():  # not handed out, so not acknowledged: the next login has them
            self._queue.get_nowait()
        self._end_events()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open(self) -> _Connection:
        conn = _Connection(self._on_frame, self._connection_lost)
        await conn._open(self.host, self.port, websocket=self.websocket, path=self.path, timeout=self.timeout)
        return conn

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("client task failed", exc_info=task.exception())

    # ---- requests ------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> Reply:
        """Send a request and return its whole reply, ok or not (raises only `ConnectionClosed`
        and `TimeoutError`). Waiting `send`/`group_send` and read-only requests are sent again after
        a reconnection; others fail with `ConnectionClosed` when the connection drops."""
        retry = op in _RETRYABLE
        state = self._state
        if not (state is _State.OPEN or state is _State.RESENDING or (state is _State.RECONNECTING and retry)):
            raise ConnectionClosed(f"not connected ({state.value})")
        pending = self._new_pending(op, fields, retry=retry, kind=_Kind.APP)
        try:
            async with asyncio.timeout(self.timeout):
                if state is _State.OPEN:
                    assert self._conn is not None
                    pending.conn = self._conn
                    await self._write(self._conn, [pending.frame])
                # else the reconnection sends it, in order with the others waiting
                return await pending.future
        finally:
            self._inflight.pop(pending.rid, None)

    async def _internal(self, conn: _Connection, op: str, kind: _Kind = _Kind.INTERNAL, **fields: Any) -> Reply:
        """A request of the library itself, on `conn` whatever the state; a timeout drops `conn`."""
        pending = self._new_pending(op, fields, retry=False, kind=kind)
        pending.conn = conn
        try:
            async with asyncio.timeout(self.timeout):
                await self._write(conn, [pending.frame])
                return await pending.future
        except TimeoutError:
            log.info("no reply to %s within %.1f s; dropping the connection", op, self.timeout)
            conn.abort()
            raise
        finally:
            self._inflight.pop(pending.rid, None)

    def _new_pending(self, op: str, fields: dict[str, Any], *, retry: bool, kind: _Kind) -> _Pending:
        if self._state is _State.CLOSED:
            raise ConnectionClosed("the client is closed")
        rid = next(self._rids)
        frame = _encode({"op": op, "rid": rid, **fields}) + b"\n"
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        pending = _Pending(rid, op, frame, future, retry, kind)
        self._inflight[rid] = pending
        return pending

    async def _write(self, conn: _Connection, frames: list[bytes]) -> None:
        self._last_write = asyncio.get_running_loop().time()
        try:
            await conn.send_frames(frames)
        except Exception as exc:  # the read loop ends next, and _connection_lost settles the requests
            log.info("write to %s:%d failed (%s); dropping the connection", self.host, self.port,
                     type(exc).__name__)
            conn.abort()

    async def _call(self, op: str, **fields: Any) -> Reply:
        reply = await self.request(op, **{k: v for k, v in fields.items() if v is not None})
        if not reply.get("ok"):
            raise ReplyError(reply)
        return {k: v for k, v in reply.items() if k not in _REPLY_KEYS}

    def _fail(self, which: Callable[[_Pending], bool]) -> None:
        for pending in list(self._inflight.values()):
            if which(pending) and not pending.future.done():
                pending.future.set_exception(ConnectionClosed("connection closed"))

    # ---- account -------------------------------------------------------------------

    async def register(self, name: str, password: str) -> Reply:
        """`{"user_id"}`."""
        return await self._call("register", name=name, password=password)

    async def login(self, name: str | None = None, password: str | None = None, *,
                    token: str | None = None) -> Reply:
        """Log in with `name` and `password`, or `token`; the login reply. Its `offline` messages
        (and the rest of the inbox when `more`) also come through `events()`."""
        return await self._call("login", name=name, password=password, token=token)

    async def logout(self) -> Reply:
        """Acknowledge what was handed out, then log out (the token is revoked)."""
        if self.user is not None and self.connected:
            with contextlib.suppress(ReplyError, TimeoutError):
                await self._flush_acks()
        return await self._call("logout")

    async def ping(self) -> Reply:
        """`{"ts"}`: the server's time."""
        return await self._call("ping")

    async def lookup(self, name: str) -> Reply:
        """`{"user": {id, name}}`."""
        return await self._call("lookup", name=name)

    # ---- friends -------------------------------------------------------------------

    async def friend_request(self, user_id: int, note: str | None = None) -> Reply:
        return await self._call("friend_request", user_id=user_id, note=note)

    async def friend_accept(self, user_id: int) -> Reply:
        """`{"friend": {id, name, online}}`."""
        return await self._call("friend_accept", user_id=user_id)

    async def friend_reject(self, user_id: int) -> Reply:
        return await self._call("friend_reject", user_id=user_id)

    async def unfriend(self, user_id: int) -> Reply:
        return await self._call("unfriend", user_id=user_id)

    async def friends(self) -> Reply:
        """`{"friends": [{id, name, online}]}`."""
        return await self._call("friends")

    # ---- groups --------------------------------------------------------------------

    async def create_group(self, name: str, desc: str | None = None) -> Reply:
        """`{"group"}`."""
        return await self._call("create_group", name=name, desc=desc)

    async def join_group(self, group_id: int) -> Reply:
        """`{"group"}`."""
        return await self._call("join_group", group_id=group_id)

    async def leave_group(self, group_id: int) -> Reply:
        return await self._call("leave_group", group_id=group_id)

    async def groups(self) -> Reply:
        """`{"groups"}`."""
        return await self._call("groups")

    # ---- messages ------------------------------------------------------------------

    async def send(self, to: int, text: str, cmid: str | None = None) -> Reply:
        """`{"id", "ts"}` once stored. A `cmid` is generated when none is given, so the send is
        stored once even when it is retried across a reconnection."""
        return await self._call("send", to=to, text=text, cmid=cmid or uuid.uuid4().hex)

    async def group_send(self, group_id: int, text: str, cmid: str | None = None) -> Reply:
        """`{"id", "ts"}` once stored (with a generated `cmid` as for `send`)."""
        return await self._call("group_send", group_id=group_id, text=text, cmid=cmid or uuid.uuid4().hex)

    async def ack(self, seq: int) -> Reply:
        """Acknowledge up to `seq` by hand (the client already acks what `events()` hands out)."""
        return await self._call("ack", seq=seq)

    async def sync(self, after: int, limit: int | None = None) -> Reply:
        """`{"messages", "more"}`: inbox messages with seq > `after`, acknowledged or not. A plain
        query: its messages do not go through `events()`."""
        return await self._call("sync", after=after, limit=limit)

    async def history(self, with_: int | None = None, group_id: int | None = None, before: int | None = None,
                      limit: int | None = None) -> Reply:
        """`{"messages"}` of the conversation with user `with_`, or of group `group_id`."""
        return await self._call("history", group_id=group_id, before=before, limit=limit, **{"with": with_})

    # ---- rooms ---------------------------------------------------------------------

    async def create_room(self, name: str | None = None) -> Reply:
        """`{"room": {id, name, host, port, ws_url}}`."""
        return await self._call("create_room", name=name)

    async def join_room(self, room_id: str) -> Reply:
        """`{"room"}` with its `members`; `ReplyError` `wrong_node` (see `.error`) on another node."""
        return await self._call("join_room", room_id=room_id)

    async def room_send(self, room_id: str, text: str) -> Reply:
        """`{"ts"}`."""
        return await self._call("room_send", room_id=room_id, text=text)

    async def leave_room(self, room_id: str) -> Reply:
        return await self._call("leave_room", room_id=room_id)

    # ---- events --------------------------------------------------------------------

    def events(self) -> AsyncIterator[Event]:
        """Every event of PROTOCOL.md section 5, plus `{"event": "disconnected"}` and
        `{"event": "reconnected"}`. `message` events come once each, in inbox order, offline ones
        first. Ends after `close()`, after `kicked`, and after a lost connection that is not
        re-established (no reconnect, not logged in, or the token refused). Cancelling a wait for
        the next event (a timeout) loses nothing: the iterator stays usable."""
        return _Events(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def _next_event(self) -> Event:
        while True:
            if self._events_ended and self._queue.empty():
                self._queue.put_nowait(None)  # for any other iterator still waiting
                raise StopAsyncIteration
            item = await self._queue.get()
            if self._queue.qsize() <= _CATCH_UP_HIGH_WATER:
                self._room.set()
            if item is None:
                continue
            owner, event = item
            if event.get("event") == "message" and owner is not None and owner == self._owner:
                self._handed_out(event["seq"])
            return event

    def _put(self, event: Event) -> None:
        self._queue.put_nowait((self._owner, event))

    def _end_events(self) -> None:
        self._events_ended = True
        self._queue.put_nowait(None)

    # ---- frames from the server (called in wire order by the connection's read loop) --------

    def _on_frame(self, conn: _Connection, msg: Any) -> None:
        if not isinstance(msg, dict):
            log.warning("ignoring a frame that is not a JSON object")
            return
        if "event" in msg:
            self._on_event(msg)
            return
        rid = msg.get("rid")
        pending = self._inflight.get(rid) if isinstance(rid, int) else None
        if pending is None or pending.future.done():
            log.debug("a reply to no waiting request (op %s)", msg.get("op"))
            return
        if msg.get("ok"):
            # Handled here, before the frames that follow it, so nothing overtakes the offline messages.
            if pending.op == "login":
                self._logged_in(conn, msg, relogin=pending.kind is _Kind.RELOGIN)
            elif pending.op == "logout":
                self._forget_session()
            elif pending.kind is _Kind.CATCH_UP:
                for message in msg.get("messages") or ():
                    self._on_message(message, live=False)
                if not msg.get("more"):
                    self._end_catch_up()
        pending.future.set_result(msg)

    def _on_event(self, event: Event) -> None:
        kind = event.get("event")
        if kind == "message":
            self._on_message(event, live=True)
            return
        if kind == "kicked":
            log.info("kicked: the user logged in elsewhere; not reconnecting")
            self._kicked = True
        self._put(event)

    def _on_message(self, message: Event, *, live: bool) -> None:
        if live and self._catching_up:
            self._held.append(message)
            return
        seq = message.get("seq")
        message_id = message.get("id")
        if isinstance(seq, int) and seq <= self._last_seq:
            return  # already queued (delivered again after a reconnection)
        if isinstance(message_id, int):
            if message_id in self._seen:
                return
            self._seen[message_id] = None
            if len(self._seen) > _SEEN_IDS:
                del self._seen[next(iter(self._seen))]
        if isinstance(seq, int):
            self._last_seq = seq
        message.setdefault("event", "message")
        self._put(message)

    def _logged_in(self, conn: _Connection, reply: Reply, *, relogin: bool) -> None:
        user = reply.get("user") or {}
        if user.get("id") != self._owner:
            self._reset_inbox(user.get("id"))
        self.user = user
        self.token = reply.get("token")
        if relogin:
            self._put({"event": "reconnected"})
        self._held = []
        self._catching_up = bool(reply.get("more"))
        for message in reply.get("offline") or ():
            self._on_message(message, live=False)
        if self._handed_seq > self._acked_seq:
            self._ack_wanted.set()  # handed out before the connection dropped
        if self._catching_up:
            self._cancel_catch_up()
            self._catch_up_task = self._spawn(self._catch_up(conn))

    def _forget_session(self) -> None:
        self.user = None
        self.token = None
        self._cancel_catch_up()
        self._catching_up = False
        self._held = []

    def _reset_inbox(self, owner: int | None) -> None:
        self._owner = owner
        self._last_seq = self._handed_seq = self._acked_seq = self._unacked = 0
        self._seen.clear()

    # ---- catch-up after a login with `more` --------------------------------------------

    async def _catch_up(self, conn: _Connection) -> None:
        """`sync` pages until the end of the inbox; the node sends no live messages meanwhile.
        The pages are taken in by `_on_frame`; this only asks, as fast as the application reads."""
        try:
            while self._catching_up and not conn.closed.is_set():
                while self._queue.qsize() > _CATCH_UP_HIGH_WATER:
                    self._room.clear()
                    await self._room.wait()
                reply = await self._internal(conn, "sync", _Kind.CATCH_UP, after=self._last_seq, limit=_SYNC_PAGE)
                if not reply.get("ok"):
                    code = (reply.get("error") or {}).get("code")
                    if code in ("rate_limited", "unavailable"):
                        await asyncio.sleep(self.backoff.first)
                        continue
                    log.warning("catch-up sync failed (%s); going on with live messages", code)
                    self._end_catch_up()
                elif reply.get("more") and not reply.get("messages"):
                    log.warning("sync said `more` with an empty page; going on with live messages")
                    self._end_catch_up()
        except (ConnectionClosed, TimeoutError):
            pass  # the next login starts over

    def _end_catch_up(self) -> None:
        self._catching_up = False
        held, self._held = sorted(self._held, key=lambda m: m.get("seq", 0)), []
        for message in held:
            self._on_message(message, live=False)

    def _cancel_catch_up(self) -> None:
        task, self._catch_up_task = self._catch_up_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # ---- acks ----------------------------------------------------------------------

    def _handed_out(self, seq: int) -> None:
        if seq <= self._handed_seq:
            return
        self._handed_seq = seq
        self._unacked += 1
        self._ack_wanted.set()
        if self._unacked >= self.ack_every:
            self._ack_full.set()

    async def _ack_loop(self) -> None:
        """One cumulative `ack` per batch: `ack_delay` seconds after the first message handed out,
        or at once when `ack_every` are waiting."""
        while True:
            await self._ack_wanted.wait()
            if not self._ack_full.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ack_delay):
                        await self._ack_full.wait()
            self._ack_wanted.clear()
            self._ack_full.clear()
            if self._state is not _State.OPEN:
                continue  # the reconnection asks again
            try:
                await self._flush_acks()
            except (ConnectionClosed, TimeoutError):
                pass  # the reconnection asks again
            except ReplyError as exc:
                log.warning("ack refused (%s); retrying", exc.code)
                await asyncio.sleep(max(self.ack_delay, self.backoff.first))
                self._ack_wanted.set()

    async def _flush_acks(self) -> None:
        seq, owner, conn = self._handed_seq, self._owner, self._conn
        if seq <= self._acked_seq or conn is None:
            return
        self._unacked = 0
        reply = await self._internal(conn, "ack", seq=seq)
        if not reply.get("ok"):
            raise ReplyError(reply)
        if owner == self._owner:
            self._acked_seq = max(self._acked_seq, seq)

    # ---- keepalive -----------------------------------------------------------------

    async def _keepalive(self, interval: float) -> None:
        """A ping when nothing was written for `interval` seconds; no reply drops the connection
        (which `_internal` does), so a dead peer is noticed."""
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_write
            conn = self._conn
            if idle < interval:
                await asyncio.sleep(interval - idle)
            elif self._state is _State.OPEN and conn is not None:
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    await self._internal(conn, "ping")  # writing it restarts the idle time
            else:
                await asyncio.sleep(interval)

    # ---- losing and regaining the connection ----------------------------------------

    def _connection_lost(self, conn: _Connection) -> None:
        """Called once per connection when its read loop ends."""
        conn.abort()  # a half-closed TCP transport would stay open otherwise
        if conn is not self._conn:  # a reconnection attempt, or a connection already replaced
            self._fail(lambda p: p.conn is conn)
            return
        self._conn = None
        if self._state is _State.CLOSED:
            return
        self._cancel_catch_up()
        self._catching_up = False
        self._held = []  # not handed out, so not acked: the next login's `offline` has them
        if self._kicked:
            self._state = _State.DOWN
            self.user = None
            self.token = None
            self._fail(lambda p: True)
            self._end_events()
            return
        self._put({"event": "disconnected"})
        if self.reconnect and self.user is not None and self.token is not None:
            log.info("connection to %s:%d lost; reconnecting", self.host, self.port)
            self._state = _State.RECONNECTING
            for pending in list(self._inflight.values()):
                if pending.retry and pending.kind is _Kind.APP:
                    pending.conn = None  # sent again once logged in again
                elif not pending.future.done():
                    pending.future.set_exception(ConnectionClosed("connection lost"))
            self._lost.set()
        else:
            log.info("connection to %s:%d lost", self.host, self.port)
            self._give_up()

    def _give_up(self) -> None:
        self._state = _State.DOWN
        self.user = None
        self._fail(lambda p: True)
        self._end_events()

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            if self._state is _State.RECONNECTING:
                await self._reconnect()

    async def _reconnect(self) -> None:
        """Connect and log in again with the token, with backoff, until it works or cannot."""
        for attempt, delay in enumerate(self.backoff.delays(), 1):
            await asyncio.sleep(delay)
            token = self.token
            if self._state is not _State.RECONNECTING or token is None:
                return
            try:
                conn = await self._open()
            except (OSError, TimeoutError) as exc:
                log.info("reconnect attempt %d to %s:%d failed (%s)", attempt, self.host, self.port,
                         type(exc).__name__)
                continue
            try:
                reply = await self._internal(conn, "login", _Kind.RELOGIN, token=token)
            except (ConnectionClosed, TimeoutError):
                await conn.close()
                continue
            except BaseException:
                await conn.close()
                raise
            if not reply.get("ok"):
                await conn.close()
                code = (reply.get("error") or {}).get("code")
                if code in _FATAL_LOGIN_ERRORS:
                    log.warning("cannot log in again (%s); giving up", code)
                    self.token = None
                    self._give_up()
                    return
                log.info("reconnect attempt %d: login refused (%s)", attempt, code)
                continue
            if conn.closed.is_set():  # lost right after the login reply
                self._put({"event": "disconnected"})
                continue
            log.info("reconnected to %s:%d after %d attempt(s)", self.host, self.port, attempt)
            await self._resend(conn)
            return

    async def _resend(self, conn: _Connection) -> None:
        """Send the requests that waited for the reconnection, in their order, then go live."""
        self._conn = conn
        self._state = _State.RESENDING
        while self._conn is conn:
            waiting = [p for p in self._inflight.values() if p.conn is None and p.kind is _Kind.APP]
            if not waiting:
                break
            for pending in waiting:
                pending.conn = conn
            await self._write(conn, [p.frame for p in waiting])
        if self._conn is conn:
            self._state = _State.OPEN
            if self._handed_seq > self._acked_seq:
                self._ack_wanted.set()


class _Events(AsyncIterator[Event]):
    """The iterator of `Client.events()`: a cancelled `__anext__` leaves it usable."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        return await self._client._next_event()
