"""Several `clusterchat serve --redis` nodes on one database and one Redis, for the cluster tests.

    cluster = make_cluster(3)                     # nodes n1, n2, n3, started in parallel
    async with cluster.chats() as (c1, c2, c3):   # a `Chat` per node
        alice = await c1.user("alice")
        bob = await c2.user("bob", websocket=True)

Every cluster gets its own Redis database (keys) and, through the node's channel naming,
its own pub/sub channels, so clusters of earlier tests cannot interfere.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from support.backends import RedisServer
from support.node import NodeProcess
from support.users import Chat

_redis_dbs = itertools.cycle(range(1, 16))


class ClusterNodes:
    def __init__(self, nodes: list[NodeProcess], redis_server: RedisServer, redis_db: int) -> None:
        self.nodes = nodes
        self.redis_server = redis_server
        self.redis_db = redis_db

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_server.host}:{self.redis_server.port}/{self.redis_db}"

    def redis(self) -> redis.Redis:
        """A plain (synchronous) client of this cluster's Redis database."""
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def live_nodes(self) -> set[str]:
        """Node names registered in Redis with a fresh heartbeat (within 10 s of Redis's clock)."""
        client = self.redis()
        try:
            now_s, now_us = client.time()
            now = now_s * 1000 + now_us // 1000
            return {json.loads(v)["name"] for v in client.hvals("cc:nodes") if now - json.loads(v)["ts"] < 10_000}
        finally:
            client.close()

    def wait_live(self, names: set[str], within: float = 15) -> None:
        deadline = time.monotonic() + within
        while self.live_nodes() != names:
            assert time.monotonic() < deadline, f"live nodes {self.live_nodes()} != {names}"
            time.sleep(0.1)

    @contextlib.asynccontextmanager
    async def chats(self) -> AsyncIterator[tuple[Chat, ...]]:
        chats = tuple(Chat(node) for node in self.nodes)
        try:
            yield chats
        finally:
            for chat in chats:
                await chat.close()


MakeCluster = Callable[..., ClusterNodes]


def start_cluster(db_url: str, redis_server: RedisServer, workdir: Path, count: int, flags: Sequence[str] = (),
                  env: dict[str, Any] | None = None) -> ClusterNodes:
    """`count` nodes named n1, n2, ... on `db_url`, started in parallel, on a fresh Redis database."""
    db = next(_redis_dbs)
    cluster = ClusterNodes([], redis_server, db)
    client = cluster.redis()
    try:
        client.flushdb()
    finally:
        client.close()
    cluster.nodes = [
        NodeProcess(db_url, workdir / f"n{i}", "--redis", cluster.redis_url, "--name", f"n{i}", "--rate-limit", "0",
                    *flags, env=env)
        for i in range(1, count + 1)
    ]
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(node.start) for node in cluster.nodes]:
            future.result()
    return cluster
