"""Rooms in a cluster: placing a new room on a live node, and finding a room's node.

`create_room` picks a live node round-robin (a Redis counter over the live nodes
sorted by name) and asks it over the bus to host the room; the answer comes back on
this node's channel, and the whole exchange is bounded (CREATE_WITHIN seconds, then
`unavailable`). The hosting node records `cc:room:ID` -> its name before it answers,
so a room op on any other node can answer `wrong_node` with the right address.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from clusterchat.cluster.bus import Bus
from clusterchat.cluster.codec import RoomCreate, RoomCreated, text
from clusterchat.cluster.registry import Registry
from clusterchat.errors import ChatError, Unavailable
from clusterchat.services.rooms import RoomService

log = logging.getLogger(__name__)

CREATE_WITHIN = 5.0


class RoomPlacement:
    """The cluster's `RoomDirectory`, and `create_room` across nodes."""

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Future[Any]]) -> None:
        self._spawn = spawn
        self._bus: Bus | None = None
        self._registry: Registry | None = None
        self.rooms: RoomService | None = None
        self._waiting: dict[str, asyncio.Future[RoomCreated]] = {}

    def bind(self, bus: Bus, registry: Registry, rooms: RoomService) -> None:
        self._bus, self._registry, self.rooms = bus, registry, rooms

    def _parts(self) -> tuple[Bus, Registry, RoomService]:
        if self._bus is None or self._registry is None or self.rooms is None:
            raise Unavailable("this node is not in the cluster yet; retry later")
        return self._bus, self._registry, self.rooms

    # ---- create_room ----------------------------------------------------------------

    async def create(self, name: str | None) -> dict[str, Any]:
        bus, _, _ = self._parts()
        bus.require_ready()
        try:
            async with asyncio.timeout(CREATE_WITHIN):
                return await self._place(name)
        except TimeoutError:
            raise Unavailable(f"no node answered within {CREATE_WITHIN:.0f} s; retry later") from None

    async def _place(self, name: str | None) -> dict[str, Any]:
        bus, registry, _ = self._parts()
        live = await registry.fresh()
        if not live:
            raise Unavailable("no live node to place the room on")
        turn = await bus.call(bus.redis.incr(bus.names.placements))
        target = live[(turn - 1) % len(live)].name
        if target == bus.names.node:
            return await self.host(name)
        request_id = secrets.token_hex(8)
        answer: asyncio.Future[RoomCreated] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            sent = bus.publish(bus.names.node_channel(target), RoomCreate(request_id, name), confirm=True,
                               within=CREATE_WITHIN)
            assert sent is not None
            if await sent == 0:
                raise Unavailable(f"node {target} is not listening; retry later")
            reply = await answer
        finally:
            self._waiting.pop(request_id, None)
        if reply.room is None:
            raise Unavailable(f"node {target} could not create the room; retry later")
        return {"room": reply.room}

    async def host(self, name: str | None) -> dict[str, Any]:
        """Create a room on this node and record where it lives."""
        bus, _, rooms = self._parts()
        # Unique across the cluster by the counter, unguessable by the random part.
        room_id = f"{await bus.call(bus.redis.incr(bus.names.room_ids))}-{secrets.token_urlsafe(6)}"
        reply = rooms.create(name, room_id)
        try:
            await self._record([room_id])
        except Unavailable:
            rooms.rooms.pop(room_id, None)
            raise
        return reply

    async def _record(self, room_ids: list[str]) -> None:
        bus = self._parts()[0]
        names = bus.names
        async with bus.redis.pipeline(transaction=True) as pipe:
            for room_id in room_ids:
                pipe.set(names.room(room_id), names.node)
            pipe.sadd(names.rooms_of(names.node), *room_ids)
            await bus.call(pipe.execute())

    # ---- requests from other nodes --------------------------------------------------

    def on_create(self, origin: str, request: RoomCreate) -> None:
        self._spawn(self._answer(origin, request))

    async def _answer(self, origin: str, request: RoomCreate) -> None:
        room: dict[str, Any] | None = None
        try:
            room = (await self.host(request.name))["room"]
        except ChatError as exc:
            log.warning("could not host a room for node %s: %s", origin, exc.message)
        if self._bus is not None:
            self._bus.publish(self._bus.names.node_channel(origin), RoomCreated(request.request_id, room),
                              within=CREATE_WITHIN)

    def on_created(self, reply: RoomCreated) -> None:
        answer = self._waiting.get(reply.request_id)
        if answer is not None and not answer.done():
            answer.set_result(reply)

    # ---- RoomDirectory ------------------------------------------------------------

    def closed(self, room_id: str) -> None:
        if self._bus is not None:
            self._spawn(self._forget(room_id))

    async def _forget(self, room_id: str) -> None:
        assert self._bus is not None
        names = self._bus.names
        try:
            async with self._bus.redis.pipeline(transaction=True) as pipe:
                pipe.delete(names.room(room_id))
                pipe.srem(names.rooms_of(names.node), room_id)
                await self._bus.call(pipe.execute())
        except Unavailable:
            pass  # a stale key names this node, and locate() on this node knows better

    async def locate(self, room_id: str) -> dict[str, Any] | None:
        bus, registry, _ = self._parts()
        value = await bus.call(bus.redis.get(bus.names.room(room_id)))
        node = None if value is None else text(value)
        if node is None or node == bus.names.node:
            return None  # none, or ours and ended
        info = await registry.info(node)
        return None if info is None else info.address

    async def reregister(self) -> None:
        """Record our rooms again (Redis may have lost them)."""
        _, _, rooms = self._parts()
        if rooms.rooms:
            await self._record(list(rooms.rooms))
