"""A node's place in the cluster: wiring the bus, registry, online map, hub and rooms, and their lifespan.

Start: clear what an earlier run of this node left in Redis, register, subscribe.
Every (re)subscription: heartbeat, reconcile the online map with the sessions here,
record our rooms, then catch every live session up from its inbox (whatever was
published while we were deaf is in the database). Stop: deregister, take our users
out of the online map and tell every node they went offline.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

from clusterchat.cluster.bus import Bus
from clusterchat.cluster.codec import CatchUp, Payload, RoomCreate, RoomCreated, UsersGone
from clusterchat.cluster.hub import ClusterHub
from clusterchat.cluster.presence import OnlineMap
from clusterchat.cluster.registry import DEAD_AFTER, NodeInfo, Registry
from clusterchat.cluster.rooms import RoomPlacement
from clusterchat.errors import Unavailable
from clusterchat.storage.inbox import MessageStore

if TYPE_CHECKING:
    from clusterchat.node import ChatNode

log = logging.getLogger(__name__)

START_WITHIN = 15.0  # seconds to reach Redis at start


class ClusterLink:
    def __init__(self, node: ChatNode, hub: ClusterHub, placement: RoomPlacement, messages: MessageStore) -> None:
        self._node = node
        self._hub = hub
        self._placement = placement
        self._messages = messages
        self._heartbeat: asyncio.Task[None] | None = None
        self._epoch: bytes | str | None = None

    async def start(self) -> None:
        node = self._node
        url = node.config.redis_url
        assert url is not None
        self.bus = Bus(url, node.name, self._on_payload, on_resync=self._resync)
        self.online = OnlineMap(self.bus, int(DEAD_AFTER * 1000))
        self.registry = Registry(self.bus, self.online, self._describe, after_beat=self._after_beat,
                                 on_reaped=self.on_reaped)
        self._hub.bind(self.bus, self.online, self.registry)
        self._placement.bind(self.bus, self.registry, node.rooms)
        deadline = time.monotonic() + START_WITHIN
        while True:
            try:
                # An earlier run under this name may have left users "online"; they are not.
                leftover = await self.online.reap(node.name, force=True)
                await self._redis_lost_data()
                await self.registry.beat()
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    await self.bus.close(flush_within=0)
                    raise RuntimeError(f"cannot reach Redis within {START_WITHIN:.0f} s") from None
                await asyncio.sleep(0.5)
        if leftover:
            log.info("%d users of an earlier run of %s were still online; now offline", len(leftover), node.name)
            self.bus.publish(self.bus.names.deliver, UsersGone(node.name, leftover))
        await self.bus.start(max(1.0, deadline - time.monotonic()))
        self._heartbeat = node.loop.create_task(self.registry.run(), name="heartbeat")
        log.info("node %s joined the cluster (%d live nodes)", node.name, len(self.registry.live))

    def begin_stop(self) -> None:
        """From now on sessions end quietly here; `stop` tells the other nodes at once."""
        self._hub.stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def stop(self) -> None:
        try:
            users = await self.registry.leave()
            if users:
                self.bus.publish(self.bus.names.deliver, UsersGone(self._node.name, users))
            log.info("node %s left the cluster; %d users now offline", self._node.name, len(users))
        except Unavailable:
            log.warning("node %s could not deregister (Redis unreachable); it will be reaped", self._node.name)
        await self.bus.close(flush_within=2.0)

    # ---- callbacks ------------------------------------------------------------------

    def _describe(self) -> NodeInfo:
        node = self._node
        host = node.config.public_host
        return NodeInfo(name=node.name, host=host, port=node.tcp_address[1],
                        ws_url=f"ws://{host}:{node.ws_address[1]}/ws",
                        connections=len(node.connections), rooms=len(node.rooms.rooms))

    def _on_payload(self, origin: str, payload: Payload) -> None:
        match payload:
            case RoomCreate():
                self._placement.on_create(origin, payload)
            case RoomCreated():
                self._placement.on_created(payload)
            case CatchUp():
                self._node.spawn(self._catch_up())
            case _:
                self._hub.on_payload(origin, payload)

    def on_reaped(self, node: str, users: list[int]) -> None:
        self._hub.users_gone(users)
        self.bus.publish(self.bus.names.deliver, UsersGone(node, users))

    async def _redis_lost_data(self) -> bool:
        """True when Redis lost its data (restarted without persistence) since we last looked."""
        bus = self.bus
        await bus.call(bus.redis.set(bus.names.epoch, secrets.token_hex(8), nx=True))
        epoch = await bus.call(bus.redis.get(bus.names.epoch))
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return lost

    async def _after_beat(self, new: bool) -> None:
        if new or self._hub.dirty:
            lost = await self._redis_lost_data()
            await self._hub.reconcile(revive=not lost)
            await self._placement.reregister()

    async def _resync(self) -> None:
        """We (re)subscribed: whatever was published while we could not hear is in the database."""
        started = time.monotonic()
        lost = await self._redis_lost_data()
        if lost:
            log.warning("Redis lost its data; registering this node's users and rooms again")
        await self.registry.beat()
        await self._hub.reconcile(revive=not lost)
        await self._placement.reregister()
        count = await self._catch_up()
        log.info("resynced: %d sessions checked against their inboxes in %.0f ms", count,
                 (time.monotonic() - started) * 1000)

    async def _catch_up(self) -> int:
        """Every live session gets what its inbox has and it has not seen (the sessions' gap fill)."""
        sessions = [s for s in self._hub.sessions.values() if s.user_id is not None]
        if sessions:
            heads = await self._messages.last_seqs([s.user_id for s in sessions if s.user_id is not None])
            for session in sessions:
                if session.user_id is not None and session.user_id in heads:
                    session.catch_up_to(heads[session.user_id])
        return len(sessions)
