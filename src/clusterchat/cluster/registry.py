"""Cluster membership: this node's heartbeat, the live nodes, and reaping the dead.

Every HEARTBEAT seconds a node writes its entry in the hash `cc:nodes` (name, TCP and
WebSocket address, connections, rooms) stamped with Redis's clock, and reads every
entry back in the same script. An entry older than DEAD_AFTER seconds is a dead node:
the first live node to see it reaps it (one script, so exactly one reaper wins),
removing its users from the online map and telling every node they went offline.
A node dead at time t is thus reaped by t + DEAD_AFTER + HEARTBEAT (12 s), within the
15 seconds of PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec

from clusterchat.cluster.bus import Bus
from clusterchat.cluster.presence import OnlineMap
from clusterchat.errors import Unavailable

log = logging.getLogger(__name__)

HEARTBEAT = 2.0
DEAD_AFTER = 10.0

# KEYS: nodes. ARGV: name, this node's entry as JSON (without ts). Stamps the entry with
# Redis's time; returns {now, 1 if the entry was new (first beat, or we had been reaped or
# Redis lost its data), every entry}.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local info = cjson.decode(ARGV[2])
info['ts'] = now
local new = redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(info))
return {now, new, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: nodes. Returns {now, every entry}.
READ = """
local t = redis.call('TIME')
return {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), redis.call('HGETALL', KEYS[1])}
"""


class NodeInfo(msgspec.Struct, frozen=True):
    name: str
    host: str
    port: int
    ws_url: str
    connections: int = 0
    rooms: int = 0
    ts: int = 0

    @property
    def address(self) -> dict[str, str | int]:
        return {"host": self.host, "port": self.port, "ws_url": self.ws_url}


_decode_info = msgspec.json.Decoder(NodeInfo).decode
_encode = msgspec.json.encode


class Registry:
    def __init__(self, bus: Bus, online: OnlineMap, describe: Callable[[], NodeInfo], *,
                 on_reaped: Callable[[str, list[int]], None],
                 after_beat: Callable[[bool], Awaitable[None]]) -> None:
        self._bus = bus
        self._online = online
        self._describe = describe
        self._on_reaped = on_reaped
        self._after_beat = after_beat  # called with True when our entry had been lost
        self.name = bus.names.node
        self.live: dict[str, NodeInfo] = {}
        self._beat = bus.redis.register_script(BEAT)
        self._read = bus.redis.register_script(READ)
        self._first = True

    def is_live(self, node: str) -> bool:
        return node == self.name or node in self.live

    def _view(self, now: int, flat: list[bytes]) -> dict[str, NodeInfo]:
        nodes = {}
        for i in range(0, len(flat), 2):
            try:
                info = _decode_info(flat[i + 1])
            except msgspec.DecodeError:
                log.warning("ignoring a malformed node entry")
                continue
            nodes[info.name] = info
        self.live = {n: i for n, i in nodes.items() if now - i.ts < DEAD_AFTER * 1000}
        return nodes

    async def beat(self) -> bool:
        """Stamp our entry, refresh the live view, and reap whatever died. True when our
        entry had been lost (we were reaped, or Redis lost its data) since the last beat."""
        info = msgspec.structs.asdict(self._describe())
        info.pop("ts", None)
        now, new, flat = await self._bus.call(self._beat(keys=[self._bus.names.nodes], args=[self.name, _encode(info)]))
        nodes = self._view(int(now), flat)
        lost = bool(new) and not self._first
        if lost:
            log.warning("node %s was missing from the registry (reaped, or Redis lost its data); re-registering",
                        self.name)
        self._first = False
        for name in sorted(set(nodes) - set(self.live)):
            users = await self._online.reap(name)
            if users is not None:
                log.warning("node %s stopped heart-beating: reaped, with %d users", name, len(users))
                self._on_reaped(name, users)
        return lost

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._after_beat(await self.beat())
            except Unavailable:
                pass  # the bus reports the outage; we beat again when Redis is back
            except Exception:
                log.exception("heartbeat failed")

    async def fresh(self) -> list[NodeInfo]:
        """The live nodes right now (read from Redis), sorted by name."""
        now, flat = await self._bus.call(self._read(keys=[self._bus.names.nodes]))
        self._view(int(now), flat)
        return [self.live[n] for n in sorted(self.live)]

    async def info(self, node: str) -> NodeInfo | None:
        """A live node's entry (re-read from Redis if we do not know it yet)."""
        if node not in self.live:
            await self.fresh()
        return self.live.get(node)

    async def leave(self) -> list[int]:
        """Deregister (a clean stop): our entry and our users' entries go; our users."""
        return await self._online.reap(self.name, force=True) or []
