"""Who is online where: the online map in Redis and its atomic updates (Lua scripts).

`cc:online` maps a user id to "NODE CLAIM", the node and the login (claim) that hold
the user; `cc:users:NODE` lists the same entries per node, so a dead node's users can
be found without scanning everyone. Every change of both happens in one script, so
two nodes racing for one user (two logins, a login and a reaper, a logout and a
login elsewhere) always leave one consistent owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from clusterchat.cluster.bus import Bus
from clusterchat.cluster.codec import Names, text

# Liveness in the scripts is judged by Redis's clock, so the nodes' clocks do not matter.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: online, nodes, users-of-this-node. ARGV: user, node, claim, refuse ('1': keep a live
# session elsewhere), dead-after ms. Returns {1, previous entry or nil} or {0, the live holder}.
CLAIM = _NOW + """
local mine = ARGV[2] .. ' ' .. ARGV[3]
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_node, old_claim
if old then
  old_node, old_claim = string.match(old, '^(%S+) (%S+)$')
  if ARGV[4] == '1' and old_node ~= ARGV[2] then
    local info = redis.call('HGET', KEYS[2], old_node)
    if info and now - tonumber(cjson.decode(info)['ts']) < tonumber(ARGV[5]) then
      return {0, old}
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], mine)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if old_node and old_node ~= ARGV[2] then
  local theirs = 'cc:users:' .. old_node
  if redis.call('HGET', theirs, ARGV[1]) == old_claim then
    redis.call('HDEL', theirs, ARGV[1])
  end
end
return {1, old}
"""

# KEYS: online, users-of-this-node. ARGV: user, node, claim.
# Returns 1 (removed: it was ours), 0 (no entry), -1 (someone else holds the user now).
RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[3] then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
if current == ARGV[2] .. ' ' .. ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return -1
"""

# KEYS: nodes, online, users-of-the-node, rooms-of-the-node. ARGV: node, dead-after ms, force
# ('1': even if alive). Removes the node, every user it still holds and its rooms' keys;
# returns those users, or nil when the node is alive or already gone (so of several
# reapers exactly one does the work).
REAP = _NOW + """
local info = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' then
  if not info or now - tonumber(cjson.decode(info)['ts']) < tonumber(ARGV[2]) then
    return nil
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
local entries = redis.call('HGETALL', KEYS[3])
local gone = {}
for i = 1, #entries, 2 do
  if redis.call('HGET', KEYS[2], entries[i]) == ARGV[1] .. ' ' .. entries[i + 1] then
    redis.call('HDEL', KEYS[2], entries[i])
    gone[#gone + 1] = entries[i]
  end
end
redis.call('DEL', KEYS[3])
for _, room in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if redis.call('GET', 'cc:room:' .. room) == ARGV[1] then
    redis.call('DEL', 'cc:room:' .. room)
  end
end
redis.call('DEL', KEYS[4])
return gone
"""


class Refused(Exception):
    """A claim found the user held by a live session on another node (and was told to keep it)."""


class OnlineMap:
    def __init__(self, bus: Bus, dead_after_ms: int) -> None:
        self._bus = bus
        self._names: Names = bus.names
        self._dead_after_ms = dead_after_ms
        redis = bus.redis
        self._claim = redis.register_script(CLAIM)
        self._release = redis.register_script(RELEASE)
        self._reap = redis.register_script(REAP)

    def _claim_keys(self) -> list[str]:
        return [self._names.online, self._names.nodes, self._names.users_of(self._names.node)]

    async def claim(self, user_id: int, claim: str, *, refuse: bool) -> tuple[str, str] | None:
        """Make (this node, `claim`) the holder of `user_id`; the previous holder (node, claim).

        With `refuse`, raises `Refused` instead when a live node's session holds the user.
        """
        ok, previous = await self._bus.call(self._claim(
            keys=self._claim_keys(),
            args=[user_id, self._names.node, claim, "1" if refuse else "0", self._dead_after_ms]))
        if not ok:
            raise Refused(previous)
        return _holder(previous)

    async def reclaim(self, claims: Sequence[tuple[int, str]]) -> list[tuple[int, bool, tuple[str, str] | None]]:
        """Claim many users again (after Redis came back), keeping live holders elsewhere:
        (user, claimed, previous holder) for each."""
        results: list[tuple[int, bool, tuple[str, str] | None]] = []
        for start in range(0, len(claims), 500):
            chunk = claims[start:start + 500]
            async with self._bus.redis.pipeline(transaction=False) as pipe:
                for user_id, claim in chunk:
                    await self._claim(keys=self._claim_keys(), client=pipe,
                                      args=[user_id, self._names.node, claim, "1", self._dead_after_ms])
                replies = await self._bus.call(pipe.execute())
            results.extend((user_id, bool(ok), _holder(previous))
                           for (user_id, _), (ok, previous) in zip(chunk, replies, strict=True))
        return results

    async def release(self, user_id: int, claim: str) -> int:
        """Drop the entry if it is still (this node, `claim`): 1 dropped, 0 none, -1 held elsewhere."""
        return int(await self._bus.call(self._release(
            keys=[self._names.online, self._names.users_of(self._names.node)],
            args=[user_id, self._names.node, claim])))

    async def reap(self, node: str, *, force: bool = False) -> list[int] | None:
        """Remove a dead (or, with `force`, any) node and its users; the users, or None if it was
        alive or already reaped."""
        gone = await self._bus.call(self._reap(
            keys=[self._names.nodes, self._names.online, self._names.users_of(node), self._names.rooms_of(node)],
            args=[node, self._dead_after_ms, "1" if force else "0"]))
        return None if gone is None else [int(u) for u in gone]

    async def mine(self) -> dict[int, str]:
        """The entries this node holds: user -> claim."""
        entries = await self._bus.call(self._bus.redis.hgetall(self._names.users_of(self._names.node)))
        return {int(u): text(c) for u, c in entries.items()}

    async def holders(self, user_ids: Iterable[int]) -> dict[int, str]:
        """user -> the node holding it, for those of `user_ids` in the map."""
        ids = list(user_ids)
        if not ids:
            return {}
        values = await self._bus.call(self._bus.redis.hmget(self._names.online, ids))
        return {u: text(v).split(" ", 1)[0] for u, v in zip(ids, values, strict=True) if v is not None}


def _holder(entry: bytes | str | None) -> tuple[str, str] | None:
    if entry is None:
        return None
    node, _, claim = text(entry).partition(" ")
    return node, claim
