"""nginx in front of the nodes, and `clusterchat cluster`.

* The generated configuration: `nginx -t` accepts it; least_conn, passive health checks, the
  WebSocket upgrade, no proxy timeout that would drop an idle chat connection.
* A real nginx in front of two real nodes: TCP and WebSocket through it, least_conn spreading
  connections over both, new connections still served when a node is killed.
* `clusterchat cluster` as a subprocess: the addresses it prints work, a crashed node comes back,
  SIGINT stops everything (exit 0, no process left).
* With the Redis cluster bus: users on different nodes chat through nginx, and a rolling restart
  loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import redis

from clusterchat.client import ChatClient, Client
from clusterchat.launcher.backends import durable_shared_buffers_mb
from clusterchat.launcher.nginx import (
    NginxServer,
    NodeAddress,
    find_nginx,
    render_config,
    stream_module_path,
)
from clusterchat.launcher.processes import free_port
from support.backends import PgServer, RedisServer
from support.launcher import LauncherProcess
from support.node import NodeProcess

MakeNginx = Callable[..., NginxServer]
PASSWORD = "secret123"
NODES = [NodeAddress("127.0.0.1", 7100, 7101), NodeAddress("127.0.0.1", 7200, 7201)]
NGINX_DEFAULT_TIMEOUT = 600  # seconds: nginx's default proxy_timeout / proxy_read_timeout



# --------------------------------------------------------------------------- helpers


def seconds(value: str) -> float:
    """An nginx time (``24h``, ``10s``, ``500ms``, ``1h30m``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwMy]?)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(int(n) * units[u or "s"] for n, u in parts)


def directives(config: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]*);", config, re.M)


def established(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` on its listening ``port``."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


async def eventually(predicate: Callable[[], bool], within: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def connections(host: str, port: int, count: int, *, websocket: bool = False) -> AsyncIterator[list[ChatClient]]:
    """``count`` connections opened one after the other (each answers a ping before the next opens)."""
    clients: list[ChatClient] = []
    try:
        for _ in range(count):
            client = await ChatClient.connect(host, port, websocket=websocket)
            clients.append(client)
            await client.call("ping")
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Two standalone nodes, each with its own SQLite database."""
    nodes: list[NodeProcess] = []
    try:
        for k in (1, 2):
            nodes.append(NodeProcess(f"sqlite:///{tmp_path / f'node{k}.db'}", tmp_path / f"node{k}",
                                     "--rate-limit", "0", "--name", f"node{k}").start())
        yield nodes
    finally:
        for node in nodes:
            node.kill()


# --------------------------------------------------------------------------- the configuration


def test_node_address_parsing() -> None:
    assert NodeAddress.parse("10.0.0.5:7000:7001") == NodeAddress("10.0.0.5", 7000, 7001)
    assert NodeAddress.parse("chat-1.internal:7000:7001").tcp == "chat-1.internal:7000"
    v6 = NodeAddress.parse("[::1]:7000:7001")
    assert (v6.host, v6.tcp, v6.ws) == ("::1", "[::1]:7000", "[::1]:7001")
    for bad in ("10.0.0.5:7000", "10.0.0.5:7000:x", "10.0.0.5:0:7001", "host:7000:70000", ""):
        with pytest.raises(ValueError):
            NodeAddress.parse(bad)


def test_config_balances_with_least_conn_and_passive_health_checks() -> None:
    config = render_config(NODES, port=7000, ws_port=7001)
    for upstream, ports in (("clusterchat_tcp", (7100, 7200)), ("clusterchat_ws", (7101, 7201))):
        block = re.search(rf"upstream {upstream} \{{(.*?)\}}", config, re.S)
        assert block, upstream
        body = block.group(1)
        assert re.search(r"^\s*least_conn;", body, re.M)
        assert re.search(rf"^\s*zone {upstream} ", body, re.M)  # least_conn counts across workers
        servers = directives(body, "server")
        assert servers == [f"127.0.0.1:{p} max_fails=2 fail_timeout=10s" for p in ports]
    assert directives(config, "listen") == ["0.0.0.0:7000 so_keepalive=on", "0.0.0.0:7001 so_keepalive=on"]
    assert directives(config, "proxy_pass") == ["clusterchat_tcp", "http://clusterchat_ws"]


def test_config_upgrades_websockets_on_ws() -> None:
    config = render_config(NODES)
    location = re.search(r"location = /ws \{(.*?)\}", config, re.S)
    assert location
    body = location.group(1)
    assert "proxy_http_version 1.1;" in body
    assert "proxy_set_header Upgrade $http_upgrade;" in body
    assert "proxy_set_header Connection $connection_upgrade;" in body
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default upgrade;\s*''\s+close;\s*\}", config)
    assert "proxy_buffering off;" in body


def test_config_has_no_timeout_that_drops_idle_chat_connections() -> None:
    """nginx closes a proxied connection idle for proxy_timeout (stream) or proxy_read_timeout (http),
    10 minutes by default; chat connections may idle longer (the node has its own idle timeout, and
    clients ping), so both are a day, and no other timeout of the proxy path is short."""
    config = render_config(NODES)
    assert [seconds(v) for v in directives(config, "proxy_timeout")] == [86400]
    assert [seconds(v) for v in directives(config, "proxy_read_timeout")] == [86400]
    assert [seconds(v) for v in directives(config, "proxy_send_timeout")] == [86400]
    short_ok = {"proxy_connect_timeout"}  # establishing a connection to a node, not an idle one
    for name, value in re.findall(r"^\s*(\w+_timeout)\s+(\S+);", config, re.M):
        if name not in short_ok:
            assert seconds(value) > NGINX_DEFAULT_TIMEOUT, f"{name} {value}"
    for value in directives(config, "proxy_connect_timeout"):
        assert seconds(value) <= 5  # a dead node is failed over quickly


def test_config_paths_stay_in_the_prefix() -> None:
    """No root-only path: pid, logs and temp folders are relative to nginx's prefix (-p)."""
    config = render_config(NODES)
    for name in ("pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path",
                 "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"):
        values = directives(config, name)
        assert values, name
        for value in values:
            assert not value.startswith("/"), f"{name} {value}"
    assert not directives(config, "daemon")  # left to the command line: -g 'daemon off;' under supervision


def test_generated_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = find_nginx()
    server = NginxServer(nginx, tmp_path, NODES, host="127.0.0.1", port=free_port(), ws_port=free_port())
    server.write_config()  # runs nginx -t and raises if it fails
    assert "least_conn" in server.conf_path.read_text()
    result = subprocess.run([nginx, *server.argv("-t")[1:]], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_config_command_prints_the_same_config(tmp_path: Path) -> None:
    """`clusterchat nginx-config` prints what render_config makes, and nginx accepts it."""
    result = subprocess.run(
        [sys.executable, "-m", "clusterchat", "nginx-config", "--node", "127.0.0.1:7100:7101",
         "--node", "127.0.0.1:7200:7201", "--host", "127.0.0.1", "--port", str(free_port()),
         "--ws-port", str(free_port())],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    config = result.stdout
    assert directives(config, "server")[:2] == ["127.0.0.1:7100 max_fails=2 fail_timeout=10s",
                                                "127.0.0.1:7200 max_fails=2 fail_timeout=10s"]
    module = stream_module_path(find_nginx())
    assert (f"load_module {module};" in config) == (module is not None)
    (tmp_path / "nginx.conf").write_text(config)
    check = subprocess.run([find_nginx(), "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
                            "-e", str(tmp_path / "error.log")], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr

    bad = subprocess.run([sys.executable, "-m", "clusterchat", "nginx-config", "--node", "nowhere"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "HOST:PORT:WSPORT" in bad.stderr


# --------------------------------------------------------------------------- a real nginx, two real nodes


async def test_tcp_and_websocket_through_nginx(two_nodes: list[NodeProcess], make_nginx: MakeNginx) -> None:
    nginx = make_nginx(*two_nodes)
    async with await ChatClient.connect(nginx.host, nginx.port) as tcp:
        assert (await tcp.call("ping"))["ok"] is True
        assert (await tcp.call("register", name="alice", password=PASSWORD))["ok"] is True
        login = await tcp.call("login", name="alice", password=PASSWORD)
        assert login["user"]["name"] == "alice"
    async with await ChatClient.connect(nginx.host, nginx.ws_port, websocket=True) as ws:
        assert (await ws.call("ping"))["ok"] is True
        await ws.send_raw("not json")
        assert (await ws.next_event("error"))["error"]["code"] == "bad_json"  # frames pass through unchanged
        assert (await ws.call("ping"))["ok"] is True


async def test_least_conn_spreads_connections_over_both_nodes(two_nodes: list[NodeProcess],
                                                              make_nginx: MakeNginx) -> None:
    nginx = make_nginx(*two_nodes)
    k = 5
    async with connections(nginx.host, nginx.port, 2 * k):
        assert [established(n.pid, n.port) for n in two_nodes] == [k, k]
    async with connections(nginx.host, nginx.ws_port, 2 * k, websocket=True):
        assert [established(n.pid, n.ws_port) for n in two_nodes] == [k, k]
    # Each node is its own world here (its own SQLite): the same name registers once on each.
    replies = []
    async with connections(nginx.host, nginx.port, 2) as clients:
        for client in clients:
            replies.append(await client.request("register", name="carol", password=PASSWORD))
    assert [r["ok"] for r in replies] == [True, True]


async def test_new_connections_avoid_a_dead_node(two_nodes: list[NodeProcess], make_nginx: MakeNginx) -> None:
    nginx = make_nginx(*two_nodes)
    alive, dead = two_nodes
    dead.kill()
    for websocket, port in ((False, nginx.port), (True, nginx.ws_port)):
        async with connections(nginx.host, port, 6, websocket=websocket) as clients:
            assert len(clients) == 6  # every one answered its ping: nginx retried the next node
            assert established(alive.pid, alive.ws_port if websocket else alive.port) == 6
    error_log = (nginx.prefix / "error.log").read_text()
    assert "Connection refused" in error_log  # nginx did try the dead node, and moved on


async def test_the_proxy_timeout_is_what_closes_idle_connections(two_nodes: list[NodeProcess],
                                                                 make_nginx: MakeNginx) -> None:
    """The directives the configuration test checks are the ones that matter: with a 1-second
    proxy timeout nginx drops a quiet connection (TCP and WebSocket); with the generated one it
    keeps it. (nginx's default, 10 minutes, is too long to wait for here.)"""
    short = make_nginx(*two_nodes, proxy_timeout="1s")
    normal = make_nginx(*two_nodes)
    clients = [await ChatClient.connect(short.host, short.port),
               await ChatClient.connect(short.host, short.ws_port, websocket=True),
               await ChatClient.connect(normal.host, normal.port),
               await ChatClient.connect(normal.host, normal.ws_port, websocket=True)]
    try:
        for client in clients:
            await client.call("ping")
        await asyncio.sleep(3)
        assert [c.closed.is_set() for c in clients] == [True, True, False, False]
        for client in clients[2:]:
            assert (await client.call("ping"))["ok"] is True
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --------------------------------------------------------------------------- clusterchat cluster


def test_cluster_refuses_sqlite(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "clusterchat", "cluster", "--db", f"sqlite:///{tmp_path}/x.db"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert "SQLite cannot be shared" in result.stderr


async def register_login_ping(host: str, port: int, name: str, *, websocket: bool = False) -> None:
    async with await ChatClient.connect(host, port, websocket=websocket) as client:
        assert (await client.call("register", name=name, password=PASSWORD))["ok"] is True
        assert (await client.call("login", name=name, password=PASSWORD))["user"]["name"] == name
        assert (await client.call("ping"))["ok"] is True


def assert_all_gone(pids: list[int]) -> None:
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[psutil.Process(p).cmdline() for p in alive]}"


async def test_cluster_starts_everything_and_sigint_stops_it(tmp_path: Path) -> None:
    cluster = LauncherProcess(tmp_path, "--nodes", "2", "--port", "0", "--ws-port", "0").start()
    try:
        out = "\n".join(cluster.lines)
        assert sorted(cluster.nodes) == ["node1", "node2"]
        assert re.search(r"^\s+redis\s+redis://127\.0\.0\.1:\d+/0\s+\(started here\)", out, re.M), out
        db_port = re.search(r"^\s+database\s+postgresql://postgres@127\.0\.0\.1:(\d+)/clusterchat\s+"
                            r"\(PostgreSQL started here\)", out, re.M)
        assert db_port is not None, out
        assert re.search(rf"^\s+websocket\s+ws://127\.0\.0\.1:{cluster.ws_port}/ws", out, re.M), out
        # The database started here is durable, with a buffer cache bigger than PostgreSQL's 128 MB default.
        conn = await asyncpg.connect(host="127.0.0.1", port=int(db_port.group(1)), user="postgres",
                                     database="clusterchat")
        try:
            settings = await conn.fetchrow("SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
                                           " pg_size_bytes(current_setting('shared_buffers')),"
                                           " current_setting('wal_init_zero')")
        finally:
            await conn.close()
        assert tuple(settings) == ("on", "on", durable_shared_buffers_mb() * 2**20, "off"), settings

        await register_login_ping(cluster.host, cluster.port, "alice")
        await register_login_ping(cluster.host, cluster.ws_port, "bob", websocket=True)
        async with await ChatClient.connect(cluster.host, cluster.port) as again:  # the database is shared
            login = await again.call("login", name="bob", password=PASSWORD)
            assert login["user"]["name"] == "bob"
        # The nodes form a cluster: users that nginx put on different nodes chat.
        nodes = list(cluster.nodes.values())
        before = [established(n.pid, n.port) for n in nodes]
        carol = await logged_in(cluster.host, cluster.port, "carol")
        dave = await logged_in(cluster.host, cluster.port, "dave")
        try:
            after = [established(n.pid, n.port) for n in nodes]
            assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]  # one on each node
            await befriend(carol, dave)
            assert dave.user is not None
            await carol.send(dave.user["id"], "across the cluster")
            assert (await next_message(dave))["text"] == "across the cluster"
        finally:
            await asyncio.gather(carol.close(), dave.close())

        children = [p.pid for p in cluster.descendants()]
        names = {p.name() for p in cluster.descendants()}
        assert {"nginx", "redis-server", "postgres"} <= names, names
        node_pids = [n.pid for n in cluster.nodes.values()]
        assert set(node_pids) <= set(children)
    except BaseException:
        cluster.kill()
        raise
    assert cluster.stop(signal.SIGINT) == 0, cluster.output
    assert_all_gone(children)
    assert "stopping the nodes, then nginx" in cluster.output


async def test_cluster_with_given_backends_restarts_a_crashed_node(tmp_path: Path, pg_server: PgServer,
                                                                  redis_server: RedisServer) -> None:
    database = f"t_launcher_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(database)
    fresh_redis(redis_server)
    db_url = f"postgresql://postgres:hunter2@{pg_server.host}:{pg_server.port}/{database}"  # trust: any password
    cluster = LauncherProcess(tmp_path, "--nodes", "2", "--port", "0", "--ws-port", "0", "--db", db_url,
                             "--redis", redis_server.url).start()
    try:
        out = "\n".join(cluster.lines)
        assert "hunter2" not in cluster.output
        assert re.search(rf"^\s+database\s+postgresql://postgres:\*\*\*@\S+/{database}\s+\(given\)", out, re.M), out
        assert re.search(rf"^\s+redis\s+{re.escape(redis_server.url)}\s+\(given\)", out, re.M), out
        names = {p.name() for p in cluster.descendants()}
        assert "redis-server" not in names and "postgres" not in names, names

        victim = cluster.nodes["node1"]
        psutil.Process(victim.pid).kill()
        cluster.wait_for_line(r"^clusterchat cluster: node1 restarted: ", timeout=30)
        assert cluster.nodes["node1"].pid != victim.pid
        assert "node1 (pid" in cluster.output and "exited unexpectedly" in cluster.output
        for k in range(4):  # both nodes serve again, whichever nginx picks
            await register_login_ping(cluster.host, cluster.port, f"user{k}")
        children = [p.pid for p in cluster.descendants()]
    except BaseException:
        cluster.kill()
        raise
    assert cluster.stop(signal.SIGTERM) == 0, cluster.output
    assert_all_gone(children)
    assert redis_server.running  # a given Redis is not ours to stop
    pg_server.drop_database(database)


# --------------------------------------------------------------------------- with the Redis cluster bus


def fresh_redis(server: RedisServer) -> None:
    """Empty Redis database 0 (this file's clusters use it; support/cluster.py's use 1-15): no node
    registry, presence or rooms left by an earlier cluster."""
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def cluster_nodes(tmp_path: Path, pg_server: PgServer, redis_server: RedisServer) -> Iterator[list[NodeProcess]]:
    """Two nodes forming a cluster over the session's Redis (database 0, emptied), on a fresh PostgreSQL database."""
    fresh_redis(redis_server)
    name = f"t_nginx_{uuid.uuid4().hex[:12]}"
    db_url = pg_server.create_database(name)
    subprocess.run([sys.executable, "-m", "clusterchat", "db", "upgrade", "--db", db_url], check=True,
                   capture_output=True)
    nodes: list[NodeProcess] = []
    try:
        for k in (1, 2):
            nodes.append(NodeProcess(db_url, tmp_path / f"node{k}", "--redis", redis_server.url, "--rate-limit", "0",
                                     "--name", f"node{k}").start())
        yield nodes
    finally:
        for node in nodes:
            node.kill()
        with contextlib.suppress(Exception):
            pg_server.drop_database(name)


def node_of(nodes: list[NodeProcess], websocket: bool = False) -> Callable[[], list[int]]:
    return lambda: [established(n.pid, n.ws_port if websocket else n.port) for n in nodes]


async def logged_in(host: str, port: int, name: str, **options: Any) -> Client:
    client = Client(host, port, backoff=(0.1, 0.5), **options)
    await client.connect()
    await client.register(name, PASSWORD)
    await client.login(name, PASSWORD)
    return client


async def befriend(a: Client, b: Client) -> None:
    assert a.user is not None and b.user is not None
    await a.friend_request(b.user["id"])
    await b.friend_accept(a.user["id"])


async def next_message(client: Client, within: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(within):
        async for event in client:
            if event["event"] == "message":
                return event
    raise AssertionError("events ended")


async def on_one_node(nodes: list[NodeProcess], host: str, port: int, name: str) -> tuple[Client, NodeProcess]:
    """A logged-in client through nginx's TCP port, and the node its connection ended on."""
    before = node_of(nodes)()
    client = await logged_in(host, port, name)
    after = node_of(nodes)()
    grew = [k for k in range(len(nodes)) if after[k] > before[k]]
    assert len(grew) == 1, (before, after)
    return client, nodes[grew[0]]


async def test_users_on_different_nodes_chat_through_nginx(cluster_nodes: list[NodeProcess],
                                                           make_nginx: MakeNginx) -> None:
    nginx = make_nginx(*cluster_nodes)
    alice, alices_node = await on_one_node(cluster_nodes, nginx.host, nginx.port, "alice")
    bob, bobs_node = await on_one_node(cluster_nodes, nginx.host, nginx.port, "bob")
    carol = await logged_in(nginx.host, nginx.ws_port, "carol", websocket=True)
    try:
        assert alices_node is not bobs_node  # least_conn: the second connection went to the idle node
        assert alice.user is not None and bob.user is not None and carol.user is not None
        await befriend(alice, bob)
        await alice.send(bob.user["id"], "hello from the other node")
        assert (await next_message(bob))["text"] == "hello from the other node"
        await bob.send(alice.user["id"], "hello back")
        assert (await next_message(alice))["text"] == "hello back"
        await befriend(carol, bob)  # carol is on WebSocket, on one of the two nodes
        await carol.send(bob.user["id"], "over websocket")
        assert (await next_message(bob))["text"] == "over websocket"
    finally:
        await asyncio.gather(alice.close(), bob.close(), carol.close())


async def test_rolling_restart_through_nginx_loses_nothing(cluster_nodes: list[NodeProcess],
                                                          make_nginx: MakeNginx) -> None:
    """SIGTERM the node bob is on while alice sends: bob's client reconnects through nginx to the
    other node with its token and catches up; every message arrives exactly once, in order."""
    nginx = make_nginx(*cluster_nodes)
    alice, alices_node = await on_one_node(cluster_nodes, nginx.host, nginx.port, "alice")
    bob, bobs_node = await on_one_node(cluster_nodes, nginx.host, nginx.port, "bob")
    receiver: asyncio.Task[None] | None = None
    try:
        assert alices_node is not bobs_node
        await befriend(alice, bob)
        assert bob.user is not None
        total = 40
        received: list[str] = []

        async def receive() -> None:
            async for event in bob:
                if event["event"] == "message":
                    received.append(event["text"])
                    if len(received) == total:
                        return

        receiver = asyncio.create_task(receive())
        for i in range(total):
            await alice.send(bob.user["id"], f"m{i}")
            if i == total // 4:
                # A rolling restart: this node goes away cleanly.
                assert await asyncio.to_thread(bobs_node.terminate) == 0
            await asyncio.sleep(0.05)
        done, _ = await asyncio.wait({receiver}, timeout=30)
        assert receiver in done, f"bob received {len(received)} of {total}: {received}"
        assert received == [f"m{i}" for i in range(total)]
        assert bob.connected
        assert established(alices_node.pid, alices_node.port) == 2  # bob came back through nginx, to alice's node
        await asyncio.to_thread(bobs_node.start)  # back on its ports: nginx sends it new connections again
        async with connections(nginx.host, nginx.port, 4):
            assert all(node_of(cluster_nodes)())
    finally:
        if receiver is not None:
            receiver.cancel()
        await asyncio.gather(alice.close(), bob.close())
