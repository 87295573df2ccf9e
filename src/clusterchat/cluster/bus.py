"""The node's Redis connections: bounded commands, one ordered publisher, one self-healing subscription.

* Commands go through a bounded pool; every wait is bounded (`call`), and a Redis that
  cannot be reached becomes `unavailable`, never a hang.
* Publishes go through one queue and one task, pipelined, so they leave in the order
  they were made and one slow Redis round trip carries everything queued meanwhile.
  While Redis is away they wait in the (bounded) queue and go out when it is back.
* The subscription (the broadcast channel and this node's own channel) is watched:
  silence is answered with a PING, and a dropped, killed or silent connection is
  replaced with backoff. Every time it is (re)established the `on_resync` callback
  runs, after the subscription is confirmed, so whatever was published while the node
  was deaf can be caught up from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from clusterchat.cluster.codec import CatchUp, Names, Payload, decode, encode
from clusterchat.errors import Unavailable, register_unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMAND_TIMEOUT = 3.0  # seconds for any one Redis command (or pipeline)
CONNECT_TIMEOUT = 3.0
PING_AFTER = 3.0  # a subscription silent this long is pinged
SILENT_LIMIT = 9.0  # and replaced when even the ping got no answer by then
MAX_QUEUED_BYTES = 64 << 20  # publishes waiting for Redis; the oldest are dropped beyond this
PUBLISH_CHUNK = 1000  # publishes per pipeline

# Redis errors that mean "cannot be reached now" (not a bug): `unavailable` to clients.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError, OSError, TimeoutError,
)  # fmt: skip
register_unavailable(*REDIS_DOWN)


class Backoff:
    """Delays that double from `first` to `most`, with jitter so nodes do not reconnect in step."""

    def __init__(self, first: float = 0.25, most: float = 5.0) -> None:
        self.first = first
        self.most = most
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self.most)
        return delay


@dataclass(slots=True)
class _Outgoing:
    channel: str
    data: bytes
    future: asyncio.Future[int] | None  # resolved with the number of receivers
    deadline: float | None  # loop time after which it is pointless to send


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody may be waiting any more; do not warn about it


def redis_db(url: str) -> int:
    return int(ConnectionPool.from_url(url).connection_kwargs.get("db", 0) or 0)


class Bus:
    def __init__(self, url: str, node: str, handler: Callable[[str, Payload], None], *,
                 on_resync: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.names = Names(node, redis_db(url))
        self._handler = handler
        self._on_resync = on_resync
        self._loop = asyncio.get_running_loop()
        pool = BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=COMMAND_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT, retry=Retry(NoBackoff(), 1), client_name=f"cc-{node}")
        self.redis = Redis(connection_pool=pool)
        # The subscription's own client: no silent reconnects behind our back (we must
        # know when we were deaf, to catch up).
        self._sub_client = Redis.from_url(url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                                          retry=Retry(NoBackoff(), 0), client_name=f"cc-sub-{node}")
        self.ready = False  # subscribed: events from other nodes reach us
        self._ever_ready = asyncio.Event()
        self._queue: deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_now = asyncio.Event()  # Redis answered a command: resubscribe without waiting
        self._dropped = 0
        self._queued_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._resync: asyncio.Task[None] | None = None
        self.resyncs = 0

    # ---- lifespan ------------------------------------------------------------------

    async def start(self, within: float = 15.0) -> None:
        """Subscribe; raise RuntimeError if Redis cannot be reached within `within` seconds."""
        self._tasks = [self._loop.create_task(self._subscribe_forever(), name="bus-subscriber"),
                       self._loop.create_task(self._publish_forever(), name="bus-publisher")]
        try:
            await asyncio.wait_for(self._ever_ready.wait(), within)
        except TimeoutError:
            await self.close(flush_within=0)
            raise RuntimeError(f"cannot reach Redis within {within:.0f} s") from None

    async def close(self, flush_within: float = 2.0) -> None:
        """Send what is queued (for at most `flush_within` seconds), then close the connections."""
        if flush_within > 0 and self._queue:
            try:
                await asyncio.wait_for(self._idle.wait(), flush_within)
            except TimeoutError:
                log.warning("closing with %d publishes unsent", len(self._queue))
        tasks = [*self._tasks, *([self._resync] if self._resync else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (self.redis, self._sub_client):
            try:
                await asyncio.wait_for(client.aclose(), 2)
            except Exception as exc:
                log.debug("closing a Redis client: %s", type(exc).__name__)

    # ---- commands ------------------------------------------------------------------

    async def call(self, command: Awaitable[T], within: float = COMMAND_TIMEOUT) -> T:
        """Await a Redis command for at most `within` seconds; an outage becomes `Unavailable`."""
        try:
            async with asyncio.timeout(within):
                result = await command
        except REDIS_DOWN as exc:
            raise Unavailable("the cluster cannot be reached now; retry later") from exc
        if not self.ready:
            self._retry_now.set()
        return result

    def require_ready(self) -> None:
        if not self.ready:
            raise Unavailable("this node has lost the cluster (Redis) for now; retry later")

    # ---- publishing ----------------------------------------------------------------

    def publish(self, channel: str, payload: Payload, *, confirm: bool = False,
                within: float | None = None) -> asyncio.Future[int] | None:
        """Queue `payload` for `channel`. With `confirm`, a future of the number of receivers,
        resolved once Redis took it. With `within`, it is dropped if not sent in time."""
        future: asyncio.Future[int] | None = None
        if confirm:
            future = self._loop.create_future()
            future.add_done_callback(_retrieve)
        data = encode(self.names.origin, payload)
        self._queued_bytes += len(data)
        while self._queued_bytes > MAX_QUEUED_BYTES and self._queue:
            # The messages of dropped batches are in the inboxes: live sessions get them by the
            # catch-up after a resubscription, or by their next message's gap, or at login.
            dropped = self._queue.popleft()
            self._queued_bytes -= len(dropped.data)
            if dropped.future is not None and not dropped.future.done():
                dropped.future.set_exception(Unavailable("the cluster cannot be reached now"))
            if self._dropped == 0:
                log.warning("Redis unreachable and %d MiB of publishes queued: dropping the oldest",
                            MAX_QUEUED_BYTES >> 20)
            self._dropped += 1
        deadline = None if within is None else self._loop.time() + within
        self._queue.append(_Outgoing(channel, data, future, deadline))
        self._idle.clear()
        self._wake.set()
        return future

    async def _publish_forever(self) -> None:
        backoff = Backoff(0.1, 2.0)
        failing = False
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._loop.time()
            items: list[_Outgoing] = []
            while self._queue and len(items) < PUBLISH_CHUNK:
                item = self._queue.popleft()
                self._queued_bytes -= len(item.data)
                if item.deadline is not None and item.deadline < now:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(Unavailable("the cluster could not be reached in time"))
                    continue
                items.append(item)
            if not items:
                continue
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for item in items:
                            pipe.publish(item.channel, item.data)
                        receivers = await pipe.execute()
            except REDIS_DOWN as exc:
                # Keep them, in order, for when Redis is back; receivers drop duplicates.
                self._queue.extendleft(reversed(items))
                self._queued_bytes += sum(len(item.data) for item in items)
                if not failing:
                    log.warning("cannot publish to Redis (%s); %d publishes wait", type(exc).__name__,
                                len(self._queue))
                failing = True
                await asyncio.sleep(backoff.next())
                continue
            if failing:
                log.info("publishing to Redis again")
                failing = False
                if self._dropped:
                    log.warning("%d publishes were dropped; asking every node to catch up", self._dropped)
                    self._dropped = 0
                    self.publish(self.names.deliver, CatchUp())
                if not self.ready:
                    self._retry_now.set()
            backoff.reset()
            for item, count in zip(items, receivers, strict=True):
                if item.future is not None and not item.future.done():
                    item.future.set_result(int(count))

    # ---- the subscription ----------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        backoff = Backoff(0.25, 5.0)
        lost_at: float | None = None
        while True:
            pubsub = self._sub_client.pubsub()
            try:
                await self._subscribe(pubsub)
                self.ready = True
                self._ever_ready.set()
                self._wake.set()  # the publisher may have been waiting for Redis
                if lost_at is not None:
                    log.info("resubscribed to Redis after %.1f s; catching up", self._loop.time() - lost_at)
                self.resyncs += 1
                self._start_resync()
                backoff.reset()
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                if self.ready or lost_at is None:
                    log.warning("Redis subscription lost (%s); reconnecting", type(exc).__name__)
                    lost_at = self._loop.time()
            finally:
                self.ready = False
                await self._discard(pubsub)
            # Back off, but come back at once when a command shows Redis is there again.
            delay = backoff.next()
            self._retry_now.clear()
            await asyncio.sleep(min(delay, 0.25))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), max(0.0, delay - 0.25))

    async def _subscribe(self, pubsub: PubSub) -> None:
        channels = (self.names.deliver, self.names.inbox)
        async with asyncio.timeout(COMMAND_TIMEOUT + CONNECT_TIMEOUT):
            await pubsub.subscribe(*channels)
            confirmed = 0
            while confirmed < len(channels):
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    confirmed += 1
                elif message["type"] == "message":
                    self._dispatch(message["data"])

    async def _listen(self, pubsub: PubSub) -> None:
        last = self._loop.time()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = self._loop.time()
            if message is None:
                if now - last > SILENT_LIMIT:
                    raise redis_errors.TimeoutError("the subscription went silent")
                if now - last > PING_AFTER and not pinged:
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        await pubsub.ping()
                    pinged = True
                continue
            last = now
            pinged = False
            if message["type"] == "message":
                self._dispatch(message["data"])

    def _dispatch(self, data: bytes) -> None:
        if data.startswith(self.names.origin):
            return  # our own broadcast: delivered locally already
        try:
            origin, payload = decode(data)
        except Exception as exc:
            log.warning("dropping an undecodable bus message (%s)", type(exc).__name__)
            return
        try:
            self._handler(origin, payload)
        except Exception:
            log.exception("bus handler failed on %s from %s", type(payload).__name__, origin)

    def _start_resync(self) -> None:
        if self._resync is not None and not self._resync.done():
            self._resync.cancel()
        self._resync = self._loop.create_task(self._run_resync(), name="bus-resync")

    async def _run_resync(self) -> None:
        try:
            await self._on_resync()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The next resubscription (or heartbeat) tries again; nothing is lost meanwhile.
            log.warning("resync after (re)subscribing failed: %s", type(exc).__name__)

    async def _discard(self, pubsub: PubSub) -> None:
        try:
            await asyncio.wait_for(pubsub.aclose(), 2)
        except Exception as exc:
            log.debug("closing a dead subscription: %s", type(exc).__name__)
