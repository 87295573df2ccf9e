"""`clusterchat cluster`: a whole cluster on this machine, supervised until Ctrl-C or SIGTERM.

It starts Redis (unless given one), a shared database (unless given one: a throw-away
PostgreSQL, or MariaDB when PostgreSQL is not installed), N nodes (`clusterchat serve
--redis URL --db URL --name nodeK` on free ports) and nginx in front of them. A child that dies
is reported loudly and started again (nodes with the same name, with backoff). On SIGINT or
SIGTERM it stops the nodes first (SIGTERM, so their users' friends see them go offline), then
nginx, then what it started of Redis and the database, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Protocol

from clusterchat.launcher.backends import start_mariadb, start_postgres, start_redis
from clusterchat.launcher.nginx import NginxServer, NodeAddress, find_nginx, start_nginx
from clusterchat.launcher.processes import (
    BackendUnavailable,
    ServerStartError,
    death_signal_preexec,
    log_tail,
    remove_tree,
)
from clusterchat.storage.engine import redact

log = logging.getLogger("clusterchat.cluster")

NODE_READY = re.compile(r"^clusterchat node (\S+) listening on tcp://(\S+):(\d+) ws://(\S+):(\d+)/ws$")
NODE_START_TIMEOUT = 60.0
NODE_STOP_TIMEOUT = 20.0
DATABASE_NAME = "clusterchat"
_BACKOFF = (1.0, 30.0)  # first and longest delay before a crashed child is started again
_STABLE_AFTER = 60.0  # a child that ran this long starts its backoff over
_WATCH_INTERVAL = 1.0


@dataclass
class ClusterOptions:
    nodes: int = 2
    host: str = "127.0.0.1"
    port: int = 7000
    ws_port: int = 7001
    db_url: str | None = None
    redis_url: str | None = None
    run_dir: Path | None = None
    node_args: list[str] = field(default_factory=list)


class ClusterError(RuntimeError):
    """The cluster could not start (the message says why)."""


class _Server(Protocol):
    """A server started here and supervised by polling (Redis, the database, nginx)."""

    name: str

    @property
    def running(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def restart(self) -> None: ...


def _loud(message: str, log_path: Path | None = None) -> None:
    """A failure the operator must see: on stderr, framed, with the log's last lines."""
    tail = f"\n--- last lines of {log_path} ---\n{log_tail(log_path, 15)}" if log_path else ""
    print(f"\n!!! clusterchat cluster: {message}{tail}\n", file=sys.stderr, flush=True)


def _append(path: Path) -> IO[bytes]:
    """A log file opened for appending (a local file: opening it does not stall the loop)."""
    return open(path, "ab")


class _Backoff:
    """Delays before restarting a crashed child: doubling from 1 s to 30 s, reset once it ran a minute."""

    def __init__(self, first: float = _BACKOFF[0], longest: float = _BACKOFF[1]) -> None:
        self.first, self.longest = first, longest
        self.delay = first

    def next(self, ran_for: float) -> float:
        if ran_for >= _STABLE_AFTER:
            self.delay = self.first
        delay, self.delay = self.delay, min(self.longest, self.delay * 2)
        return delay


# --------------------------------------------------------------------------- nodes


class NodeChild:
    """One `clusterchat serve` subprocess; its stderr goes to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.base_argv = list(argv)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.address: NodeAddress | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._log: IO[bytes] | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, port: int = 0, ws_port: int = 0, timeout: float = NODE_START_TIMEOUT) -> NodeAddress:
        """Start the node and wait for its ready line; :class:`ServerStartError` if it does not come."""
        argv = [*self.base_argv, "--port", str(port), "--ws-port", str(ws_port)]
        self._log = _append(self.log_path)  # closed in _closed()
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=self._log,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only: it stops nodes in order
            preexec_fn=death_signal_preexec(signal.SIGTERM),
        )
        self.started_at = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                self.address = await self._read_ready()
        except (TimeoutError, ServerStartError) as exc:
            await self.stop(5)
            why = ("exited" if isinstance(exc, ServerStartError)
                   else f"did not print its ready line within {timeout:.0f} s")
            raise ServerStartError(f"{self.name} {why}\ncommand: {shlex.join(argv)}\n"
                                   f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}") from None
        self._drain = asyncio.create_task(self._drain_stdout(), name=f"{self.name}-stdout")
        return self.address

    async def _read_ready(self) -> NodeAddress:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            m = NODE_READY.match(line.decode(errors="replace").strip())
            if m:
                host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(m.group(2), m.group(2))  # nginx connects here
                return NodeAddress(host, int(m.group(3)), int(m.group(5)))
            self._write_log(line)
        await self.proc.wait()
        raise ServerStartError(f"{self.name} exited with code {self.proc.returncode}")

    async def _drain_stdout(self) -> None:
        """Anything else the node prints goes to its log (an unread pipe would block it)."""
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._write_log(line)

    def _write_log(self, line: bytes) -> None:
        if self._log is not None:
            self._log.write(line)
            self._log.flush()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        await self._closed()
        return code

    async def stop(self, timeout: float = NODE_STOP_TIMEOUT) -> int | None:
        """SIGTERM (the node closes its sessions cleanly), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                log.error("%s did not stop within %.0f s: killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await self._closed()
        return self.proc.returncode

    async def _closed(self) -> None:
        if self._drain is not None:
            drain, self._drain = self._drain, None
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(drain, 2)  # the pipe's end follows the process's
        if self._log is not None:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """The supervised children once the backends are up: nodes, then nginx."""

    def __init__(self, options: ClusterOptions, run_dir: Path, db_url: str, redis_url: str,
                 servers: list[_Server]) -> None:
        self.options = options
        self.run_dir = run_dir
        self.db_url = db_url
        self.redis_url = redis_url
        self.servers = servers  # the backends started here, polled for crashes
        self.nodes: list[NodeChild] = []
        self.nginx: NginxServer | None = None
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    def _node_argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "clusterchat", "serve", "--host", self.options.host, "--db", self.db_url,
                "--redis", self.redis_url, "--name", name, *self.options.node_args]

    async def _upgrade_schema(self) -> None:
        """Once, before the nodes start: N nodes migrating one fresh database at once would race."""
        log_path = self.run_dir / "db-upgrade.log"
        with _append(log_path) as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "clusterchat", "db", "upgrade", "--db", self.db_url,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
            code = await proc.wait()
        if code != 0:
            raise ServerStartError(f"cannot create the schema in {redact(self.db_url)}\n{log_tail(log_path)}")

    async def run(self) -> int:
        with contextlib.ExitStack() as stack:
            try:
                startup = asyncio.create_task(self._start(stack), name="cluster-startup")
                stopping = asyncio.create_task(self._stopping.wait(), name="cluster-stop-requested")
                await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not startup.done():  # Ctrl-C while starting: stop what has started
                    startup.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await startup
                    print("clusterchat cluster: interrupted while starting", file=sys.stderr, flush=True)
                    return 0
                startup.result()  # raises what made the startup fail
                self._print_addresses()
                async with asyncio.TaskGroup() as tasks:
                    watchers = [tasks.create_task(self._watch_node(node), name=f"watch-{node.name}")
                                for node in self.nodes]
                    watchers.append(tasks.create_task(self._watch_servers(), name="watch-servers"))
                    await self._stopping.wait()
                    print("clusterchat cluster: stopping the nodes, then nginx, then what was started of Redis "
                          "and the database", file=sys.stderr, flush=True)
                    for watcher in watchers:
                        watcher.cancel()
            finally:
                await self._stop_nodes()
        return 0

    async def _start(self, stack: contextlib.ExitStack) -> None:
        await self._upgrade_schema()
        for k in range(1, self.options.nodes + 1):
            name = f"node{k}"
            self.nodes.append(NodeChild(name, self._node_argv(name), self.run_dir / f"{name}.log"))
        try:
            async with asyncio.TaskGroup() as group:  # one node failing stops the others' starts
                starts = [group.create_task(node.start(), name=f"start-{node.name}") for node in self.nodes]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        addresses = [start.result() for start in starts]
        # nginx's own ports are fixed (or picked once): the addresses users are given.
        self.nginx = stack.enter_context(start_nginx(
            self.run_dir / "nginx", addresses, host=self.options.host, port=self.options.port,
            ws_port=self.options.ws_port, keep=True))
        self.servers.append(self.nginx)

    async def _stop_nodes(self) -> None:
        if not self.nodes:
            return
        codes = await asyncio.gather(*(node.stop() for node in self.nodes))
        for node, code in zip(self.nodes, codes, strict=True):
            if code not in (0, None):
                log.warning("%s exited with code %s", node.name, code)

    def _print_addresses(self) -> None:
        assert self.nginx is not None
        o = self.options
        lines = [
            f"clusterchat cluster: {len(self.nodes)} node(s) behind nginx; files in {self.run_dir}",
            f"  tcp        {self.nginx.tcp_address}  (nginx, least_conn over the nodes)",
            f"  websocket  {self.nginx.ws_url}  (nginx)",
        ]
        for node in self.nodes:
            assert node.address is not None
            lines.append(f"  node       {node.name} tcp://{node.address.tcp} ws://{node.address.ws}/ws  "
                         f"pid {node.pid}, log {node.log_path}")
        redis_note = "given" if o.redis_url else "started here"
        db_note = "given" if o.db_url else f"{self._db_kind()} started here"
        lines += [
            f"  redis      {self.redis_url}  ({redis_note})",
            f"  database   {redact(self.db_url)}  ({db_note})",
            f"  nginx      pid {self.nginx.pid}, config {self.nginx.conf_path}",
            f"clusterchat cluster ready: tcp://{self.nginx.tcp_address} {self.nginx.ws_url}",
            "Ctrl-C (or SIGTERM) stops all of it.",
        ]
        print("\n".join(lines), flush=True)

    def _db_kind(self) -> str:
        return "MariaDB" if self.db_url.startswith("mysql") else "PostgreSQL"

    # ---- supervision ------------------------------------------------------------

    async def _watch_node(self, node: NodeChild) -> None:
        backoff = _Backoff()
        while True:
            code = await node.wait()
            if self._stopping.is_set():
                return
            ran_for = time.monotonic() - node.started_at
            delay = backoff.next(ran_for)
            node.restarts += 1
            _loud(f"{node.name} (pid {node.pid}) exited unexpectedly with code {code} after {ran_for:.0f} s; "
                  f"starting it again in {delay:.0f} s (restart {node.restarts})", node.log_path)
            await asyncio.sleep(delay)
            await self._restart_node(node)

    async def _restart_node(self, node: NodeChild) -> None:
        """Same name; the same ports if they are free again (nginx keeps its configuration), else new ones."""
        old = node.address
        assert old is not None
        try:
            try:
                address = await node.start(old.port, old.ws_port)
            except ServerStartError:
                log.warning("%s could not take its ports again; starting it on new ones", node.name)
                address = await node.start()
        except ServerStartError as exc:
            _loud(f"{node.name} did not start again: {exc}")
            return  # its watcher sees the process gone and tries again after the next delay
        if address != old and self.nginx is not None:
            self.nginx.reload([n.address for n in self.nodes if n.address is not None])
            log.warning("nginx reloaded: %s now at tcp://%s ws://%s/ws", node.name, address.tcp, address.ws)
        log.warning("%s is running again (pid %s, restart %d)", node.name, node.pid, node.restarts)
        print(f"clusterchat cluster: {node.name} restarted: tcp://{address.tcp} ws://{address.ws}/ws pid {node.pid}",
              flush=True)

    async def _watch_servers(self) -> None:
        backoff = {id(server): _Backoff() for server in self.servers}
        since = {id(server): time.monotonic() for server in self.servers}
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            for server in self.servers:
                if server.running or self._stopping.is_set():
                    continue
                delay = backoff[id(server)].next(time.monotonic() - since[id(server)])
                _loud(f"{server.name} (pid {server.pid}) died; starting it again in {delay:.0f} s")
                await asyncio.sleep(delay)
                if self._stopping.is_set():
                    return
                try:
                    # Blocks the supervisor's loop for the restart (well under a second or two);
                    # it must fork from the main thread for the parent-death signal.
                    server.restart()
                except (ServerStartError, OSError) as exc:
                    _loud(f"{server.name} did not start again: {exc}")
                    continue
                since[id(server)] = time.monotonic()
                log.warning("%s is running again (pid %s)", server.name, server.pid)


# --------------------------------------------------------------------------- entry point


def _raise_nofile_limit() -> None:
    """Many chat connections: every child inherits the highest open-files limit we may set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the startup: whatever started is stopped


def run_cluster(options: ClusterOptions) -> int:
    """Start everything, supervise it until SIGINT/SIGTERM, stop it in order; the exit code."""
    if options.nodes < 1:
        print("clusterchat cluster: --nodes must be at least 1", file=sys.stderr)
        return 2
    if options.db_url and options.db_url.startswith("sqlite"):
        print("clusterchat cluster: SQLite cannot be shared by several nodes: give a PostgreSQL or "
              "MySQL/MariaDB URL with --db, or none to start a throw-away PostgreSQL", file=sys.stderr)
        return 2
    try:
        find_nginx()
    except BackendUnavailable as exc:
        print(f"clusterchat cluster: {exc}", file=sys.stderr)
        return 1
    _raise_nofile_limit()
    own_dir = options.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="clusterchat-cluster-")) if options.run_dir is None else options.run_dir
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with contextlib.ExitStack() as stack:
            servers: list[_Server] = []
            redis_url = options.redis_url
            if redis_url is None:
                print("clusterchat cluster: starting Redis", file=sys.stderr, flush=True)
                redis = stack.enter_context(start_redis(run_dir / "redis"))
                servers.append(redis)
                redis_url = redis.url
            db_url = options.db_url
            if db_url is None:
                db_url = _start_database(stack, run_dir, servers)
            return asyncio.run(_supervise(options, run_dir, db_url, redis_url, servers))
    except (BackendUnavailable, ServerStartError, ClusterError) as exc:
        _loud(f"cannot start the cluster: {exc}")
        return 1
    except KeyboardInterrupt:
        print("clusterchat cluster: interrupted while starting; stopped what had started", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if own_dir:
            remove_tree(run_dir)


def _start_database(stack: contextlib.ExitStack, run_dir: Path, servers: list[_Server]) -> str:
    """A throw-away PostgreSQL (durable settings), or MariaDB when PostgreSQL is not installed."""
    try:
        print("clusterchat cluster: starting PostgreSQL", file=sys.stderr, flush=True)
        pg = stack.enter_context(start_postgres(run_dir / "postgres", durable=True))
        servers.append(pg)
        return pg.create_database(DATABASE_NAME)
    except BackendUnavailable as pg_missing:
        try:
            print("clusterchat cluster: PostgreSQL is not installed; starting MariaDB", file=sys.stderr, flush=True)
            maria = stack.enter_context(start_mariadb(run_dir / "mariadb"))
        except BackendUnavailable as maria_missing:
            raise ClusterError(f"no database to share: give --db URL, or install PostgreSQL or MariaDB "
                               f"({pg_missing}; {maria_missing})") from None
        servers.append(maria)
        return maria.create_database(DATABASE_NAME)


async def _supervise(options: ClusterOptions, run_dir: Path, db_url: str, redis_url: str,
                     servers: list[_Server]) -> int:
    cluster = Cluster(options, run_dir, db_url, redis_url, servers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cluster.request_stop)
    try:
        return await cluster.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
