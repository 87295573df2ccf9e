"""One client connection, whatever its transport: ordering, limits and the inbox cursor.

A transport hands a `Session` whole frames and an `Outlet` to write to. The session
decodes them, runs them through the node's dispatcher and writes one reply per
request, in request order, even while some are still running:

* pipelined ops (send, group_send, ack, ping) start at once, behind each other;
* any other op waits until every earlier reply is written, and later requests wait
  for it, so a client that pipelines `friend_accept` then `send` sees the effect.

It also owns the user's inbox cursor: message events reach the client in strictly
increasing `seq`. A gap (a message committed but not yet seen here) is filled from
the database before anything later is written.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from clusterchat.errors import ChatError, FrameTooLarge, NotLoggedIn, RateLimited, as_chat_error, error_body
from clusterchat.protocol.codec import RequestError, decode_request, error_event, reply_error, reply_ok
from clusterchat.protocol.requests import Request

if TYPE_CHECKING:
    from clusterchat.node import ChatNode

log = logging.getLogger(__name__)

MAX_WAITING = 512  # requests read but not started; reading pauses beyond this
MAX_PENDING_EVENTS = 4096  # message events held while the cursor catches up


class Outlet(Protocol):
    """What a transport offers a session."""

    @property
    def peer(self) -> str: ...

    def write(self, data: bytes) -> None: ...
    def buffered(self) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def drain(self) -> Awaitable[None]: ...


def _log_failure(op: str, exc: BaseException) -> None:
    known = as_chat_error(exc)
    if known is None:
        log.error("%s failed", op, exc_info=exc)  # a bug: the client gets a bare `internal`
    elif known.code.value == "unavailable" and not isinstance(exc, ChatError):
        log.warning("%s: backend unavailable (%s)", op, type(exc).__name__)


class CursorState(enum.Enum):
    OFF = 0  # not logged in
    LOGGING_IN = 1  # hold events until the login reply is written
    LIVE = 2  # write events as they come, in seq order
    CATCHING_UP = 3  # a gap is being filled from the database; hold events
    PAUSED = 4  # login said `more`: the client syncs before events flow


Reply = dict[str, Any] | None
Outcome = Reply | asyncio.Future[Any] | Coroutine[Any, Any, Reply]


class _Slot:
    __slots__ = ("after", "data")

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.after: Callable[[], None] | None = None


class Session:
    __slots__ = (
        "_cursor", "_epoch", "_exclusive", "_max_seen", "_pending", "_rate_last", "_rate_tokens",
        "_reading_paused", "_replies", "_waiting", "claim", "closed", "friends", "last_frame", "next_seq",
        "node", "outlet", "token", "user_id", "user_name",
    )  # fmt: skip

    def __init__(self, node: ChatNode, outlet: Outlet) -> None:
        self.node = node
        self.outlet = outlet
        self.user_id: int | None = None
        self.user_name = ""
        self.token: str | None = None
        self.friends: set[int] = set()
        self.claim: str | None = None  # in a cluster: this login's entry in the online map
        self.closed = False
        self.last_frame = node.loop.time()
        self._rate_tokens = float(node.config.rate_burst)
        self._rate_last = self.last_frame
        self._replies: deque[_Slot] = deque()
        self._waiting: deque[Request | bytes] = deque()
        self._exclusive = False
        self._reading_paused = False
        self._cursor = CursorState.OFF
        self._epoch = 0  # bumped by every login and logout; a catch-up of an older epoch stops
        self.next_seq = 1
        self._pending: list[tuple[int, bytes]] = []
        self._max_seen = 0
        node.connections.add(self)

    def __repr__(self) -> str:
        return f"<Session {self.outlet.peer} user={self.user_id}>"

    # ---- input ---------------------------------------------------------------

    def on_frames(self, frames: Sequence[bytes | str]) -> None:
        if self.closed:
            return
        self.last_frame = self.node.loop.time()
        for frame in frames:
            try:
                item: Request | bytes = decode_request(frame)
            except RequestError as exc:
                if exc.op is None and exc.error.code.value == "bad_json":
                    item = error_event(exc.error)
                else:
                    item = reply_error(exc.op, exc.rid, exc.error.body())
            self._waiting.append(item)
        self._pump()
        if len(self._waiting) > MAX_WAITING and not self._reading_paused:
            self._reading_paused = True
            self.outlet.pause_reading()

    def on_frame_too_large(self, exc: FrameTooLarge) -> None:
        log.info("closing %r: %s", self, exc.message)
        self.outlet.write(error_event(exc))
        self.close()

    def on_connection_lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.node.connections.discard(self)
        self._waiting.clear()
        if self.user_id is not None:
            self.node.session_ended(self)

    def close(self) -> None:
        """Close the connection (the transport calls on_connection_lost)."""
        if not self.closed:
            self.outlet.close()
            self.on_connection_lost()

    # ---- request pipeline -----------------------------------------------------

    def _pump(self) -> None:
        waiting = self._waiting
        while waiting and not self._exclusive and not self.closed:
            item = waiting[0]
            if isinstance(item, bytes):
                waiting.popleft()
                self._push_slot(_Slot(item))
                continue
            if not item.pipelined and self._replies:
                break
            waiting.popleft()
            self._start(item)
        if self._reading_paused and len(waiting) < MAX_WAITING // 2 and not self.closed:
            self._reading_paused = False
            self.outlet.resume_reading()

    def _start(self, request: Request) -> None:
        op = str(request.__struct_config__.tag)
        rid = request.rid
        slot = _Slot()
        if not self._take_token():
            slot.data = reply_error(op, rid, RateLimited().body())  # type: ignore[arg-type]
            self._push_slot(slot)
            return
        if request.needs_login and self.user_id is None:
            slot.data = reply_error(op, rid, NotLoggedIn(f"log in before `{op}`").body())  # type: ignore[arg-type]
            self._push_slot(slot)
            return
        try:
            outcome: Outcome = self.node.dispatch(self, request)
        except ChatError as exc:
            slot.data = reply_error(op, rid, exc.body())  # type: ignore[arg-type]
            self._push_slot(slot)
            return
        except Exception as exc:
            _log_failure(op, exc)
            slot.data = reply_error(op, rid, error_body(exc))  # type: ignore[arg-type]
            self._push_slot(slot)
            return
        if outcome is None or isinstance(outcome, dict):
            slot.data = reply_ok(op, rid, outcome)  # type: ignore[arg-type]
            self._push_slot(slot)
            return
        # A pipelined op that could not be queued at once (it must read something first)
        # holds back the requests after it, so they cannot overtake it.
        exclusive = not request.pipelined or not isinstance(outcome, asyncio.Future)
        if exclusive:
            self._exclusive = True
        self._replies.append(slot)
        future = outcome if isinstance(outcome, asyncio.Future) else self.node.spawn(outcome)
        future.add_done_callback(lambda f: self._finished(slot, op, rid, f, exclusive))  # type: ignore[arg-type]

    def _finished(self, slot: _Slot, op: str, rid: Any, future: asyncio.Future[Any], exclusive: bool) -> None:
        if future.cancelled():
            slot.data = reply_error(op, rid, {"code": "unavailable", "message": "the node is shutting down"})
        elif (exc := future.exception()) is not None:
            _log_failure(op, exc)
            slot.data = reply_error(op, rid, error_body(exc))
        else:
            result = future.result()
            body = result if isinstance(result, dict) else self.node.reply_body(op, result)
            slot.data = reply_ok(op, rid, body)
        if exclusive:
            self._exclusive = False
        self._flush_replies()
        self._pump()

    def _push_slot(self, slot: _Slot) -> None:
        if self._replies:
            self._replies.append(slot)
        elif slot.data is not None:
            self.write(slot.data)

    def _flush_replies(self) -> None:
        replies = self._replies
        while replies and replies[0].data is not None:
            slot = replies.popleft()
            self.write(slot.data)  # type: ignore[arg-type]
            if slot.after is not None:
                slot.after()

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Run `callback` right after the reply of the running exclusive request is written."""
        for slot in reversed(self._replies):
            if slot.data is None:
                slot.after = callback
                return
        callback()

    def _take_token(self) -> bool:
        rate = self.node.config.rate_limit
        if rate <= 0:
            return True
        now = self.node.loop.time()
        tokens = min(self.node.config.rate_burst, self._rate_tokens + (now - self._rate_last) * rate)
        self._rate_last = now
        if tokens < 1.0:
            self._rate_tokens = tokens
            return False
        self._rate_tokens = tokens - 1.0
        return True

    # ---- output -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write a frame; a client whose buffer is already over the limit is dropped."""
        if self.closed:
            return
        if self.outlet.buffered() > self.node.config.max_buffer:
            log.info("dropping %r: it stopped reading (outgoing buffer full)", self)
            # Abort, not close: a close would wait for a flush that never comes.
            self.outlet.abort()
            self.on_connection_lost()
            return
        self.outlet.write(data)

    # ---- inbox cursor -------------------------------------------------------------

    def begin_login(self) -> None:
        self._epoch += 1
        self._cursor = CursorState.LOGGING_IN
        self._pending = []
        self._max_seen = 0

    def end_login(self, last_seq: int, more: bool) -> None:
        """The login reply (its offline messages end at `last_seq`) is written."""
        self.next_seq = last_seq + 1
        if more:
            self._cursor = CursorState.PAUSED
            for seq, _ in self._pending:
                self._max_seen = max(self._max_seen, seq)
            self._pending = []
        else:
            self._cursor = CursorState.LIVE
            self._drain_pending()

    def end_session(self) -> None:
        self._epoch += 1
        self._cursor = CursorState.OFF
        self._pending = []

    def synced(self, last_seq: int) -> None:
        """A `sync` gave the client everything up to `last_seq` (and nothing is left)."""
        if last_seq + 1 > self.next_seq:
            self.next_seq = last_seq + 1
        if self._cursor is CursorState.PAUSED:
            self._cursor = CursorState.LIVE
            if self._max_seen >= self.next_seq:
                self._catch_up()

    def deliver(self, seq: int, frame: bytes) -> None:
        """A message event for this user, `frame` being the whole line with its seq."""
        state = self._cursor
        if state is CursorState.LIVE:
            if seq == self.next_seq:
                self.next_seq = seq + 1
                self.write(frame)
            elif seq > self.next_seq:
                self._pending.append((seq, frame))
                self._catch_up()
        elif state is CursorState.LOGGING_IN or state is CursorState.CATCHING_UP:
            if len(self._pending) < MAX_PENDING_EVENTS:
                self._pending.append((seq, frame))
            else:
                self._max_seen = max(self._max_seen, seq)
        elif state is CursorState.PAUSED:
            self._max_seen = max(self._max_seen, seq)

    def catch_up_to(self, seq: int) -> None:
        """Messages up to `seq` were committed for this user but may never reach this node as
        events (the cluster bus lost them): fetch whatever is missing from the database."""
        state = self._cursor
        if state is CursorState.OFF or (state is CursorState.LIVE and seq < self.next_seq):
            return
        self._max_seen = max(self._max_seen, seq)
        if state is CursorState.LIVE:
            self._catch_up()

    def _drain_pending(self) -> None:
        pending = sorted(self._pending)
        self._pending = []
        for i, (seq, frame) in enumerate(pending):
            if seq < self.next_seq:
                continue
            if seq > self.next_seq:
                self._pending = pending[i:]
                self._catch_up()
                return
            self.next_seq = seq + 1
            self.write(frame)
        if self._max_seen >= self.next_seq:
            self._catch_up()

    def _catch_up(self) -> None:
        if self._cursor is CursorState.CATCHING_UP or self.closed:
            return
        self._cursor = CursorState.CATCHING_UP
        self.node.spawn(self._catch_up_from_db())

    async def _catch_up_from_db(self) -> None:
        assert self.user_id is not None
        user_id, epoch = self.user_id, self._epoch
        try:
            for attempt in range(50):
                # Read up to the first event held here (those we write ourselves), or to
                # the highest seq seen when events were not held.
                upto = min(self._pending)[0] - 1 if self._pending else self._max_seen
                if upto < self.next_seq:
                    break
                page = await self.node.messages.since(user_id, self.next_seq - 1, min(500, upto - self.next_seq + 1))
                if self.closed or self._epoch != epoch:
                    return
                for message in page.messages:
                    if message.seq == self.next_seq:
                        self.write(self.node.message_frame(message))
                        self.next_seq += 1
                if not page.messages:
                    await asyncio.sleep(0.01 * (attempt + 1))  # committed elsewhere, not yet visible
                else:
                    await self.outlet.drain()
                if self.closed or self._epoch != epoch:
                    return
        except Exception as exc:
            # The client still gets what it missed, by sync or at its next login.
            _log_failure(f"catch-up for user {user_id}", exc)
        if self.closed or self._epoch != epoch:
            return
        self._cursor = CursorState.LIVE
        if self._max_seen < self.next_seq:
            self._max_seen = 0
        if self._pending and min(self._pending)[0] > self.next_seq:
            log.warning("user %d: seqs from %d never became readable; skipping to the next one held",
                        user_id, self.next_seq)
            self.next_seq = min(self._pending)[0]
        self._drain_pending()
