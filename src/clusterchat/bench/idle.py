"""`clusterchat bench idle`: many logged-in, idle connections, and what they cost the server.

This module owns the memory benchmark: it registers N users with fixed names
(`PREFIX0`..`PREFIX{N-1}`, so later runs reuse them), measures the server's RSS with
nothing of ours connected, opens N connections (spread over 127.0.0.x source addresses
past ~25,000), measures again, logs every connection in, lets things settle, measures a
third time, and reports KiB per connection and per logged-in session. While connected,
every connection pings within the node's idle timeout.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

from clusterchat.bench.conn import (
    BenchConn,
    RequestFailed,
    connect,
    gather_limited,
    keepalive,
    raise_nofile_limit,
    register_names,
    source_address,
)
from clusterchat.bench.stats import ErrorCounts, LatencySummary, progress, table, write_json

SETUP_PARALLEL = 50
CONNECT_PARALLEL = 200


@dataclass(slots=True)
class IdleOptions:
    target: tuple[str, int]
    users: int
    server_pid: int | None = None
    prefix: str = "idle"
    password: str = "benchpass"
    transport: str = "tcp"
    settle: float = 5.0
    hold: float = 0.0
    ping_interval: float = 30.0
    per_source: int = 20000
    json_path: str | None = None
    quiet: bool = False


class IdleUser(BenchConn):
    __slots__ = ("kicked",)

    def __init__(self, index: int, websocket: bool) -> None:
        super().__init__(index, websocket)
        self.kicked = False

    def on_setup_event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "kicked":
            self.kicked = True


def find_server_pid(port: int) -> int | None:
    """The pid of the process listening on `port` on this machine, when it can be seen."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except (psutil.AccessDenied, OSError):
        pass
    return None


def server_rss(proc: psutil.Process | None) -> int | None:
    """The server's resident anonymous memory (heap, stacks): on Linux `RssAnon`, leaving out
    the file pages it maps (SQLite maps its database, and those pages come and go with
    checkpoints, megabytes at a time); elsewhere the whole RSS."""
    if proc is None:
        return None
    try:
        with open(f"/proc/{proc.pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return None


def _error_kind(step: str, exc: BaseException) -> str:
    """`login:bad_credentials` for an error reply, `connect:ConnectionRefusedError` for anything else."""
    return f"{step}:{exc.code}" if isinstance(exc, RequestFailed) else f"{step}:{type(exc).__name__}"


def _kib(x: int | None) -> str:
    return "-" if x is None else f"{x / 1024:,.0f} KiB"


async def run_idle(o: IdleOptions) -> int:
    limit = raise_nofile_limit()
    if o.users + 64 > limit:
        print(f"bench idle: {o.users} connections need more open files than the limit of {limit}", file=sys.stderr)
        return 2
    websocket = o.transport == "ws"
    host, port = o.target
    pid = o.server_pid or find_server_pid(port)
    proc: psutil.Process | None = None
    if pid:
        try:
            proc = psutil.Process(pid)
        except psutil.Error as exc:
            print(f"bench idle: cannot watch server pid {pid}: {exc}", file=sys.stderr)
            return 2
    me = psutil.Process(os.getpid())
    say = (lambda _m: None) if o.quiet else progress

    t0 = time.perf_counter()
    created, existing = await register_names([o.target], [f"{o.prefix}{i}" for i in range(o.users)],
                                             o.password, websocket=websocket, pool=SETUP_PARALLEL)
    register_s = time.perf_counter() - t0
    say(f"bench idle: {created} users registered, {existing} already there ({register_s:.1f} s)")
    await asyncio.sleep(min(o.settle, 2.0))
    rss_base = server_rss(proc)
    own_base = me.memory_info().rss
    say(f"bench idle: server RSS before connecting {_kib(rss_base)}")

    conns: list[IdleUser] = []
    errors = ErrorCounts()
    login_ns: list[int] = []
    stop = asyncio.Event()
    keeper = asyncio.get_running_loop().create_task(keepalive(conns, o.ping_interval, stop))
    status = 0
    try:
        t1 = time.perf_counter()
        results = await gather_limited(
            [connect(lambda i=i: IdleUser(i, websocket), host, port, websocket=websocket,  # type: ignore[misc]
                     local_addr=source_address(i, o.users, host, o.per_source)) for i in range(o.users)],
            CONNECT_PARALLEL,
        )
        conns.extend(r for r in results if isinstance(r, IdleUser))
        connect_failures = [r for r in results if isinstance(r, BaseException)]
        connect_s = time.perf_counter() - t1
        for c in conns:
            c.last_write = time.monotonic()
        say(f"bench idle: {len(conns)} connected in {connect_s:.1f} s"
            + (f", {len(connect_failures)} failed ({connect_failures[0]!r})" if connect_failures else ""))
        await asyncio.sleep(min(o.settle, 2.0))
        rss_connected = server_rss(proc)

        t2 = time.perf_counter()
        done = 0

        async def login(c: IdleUser) -> None:
            nonlocal done
            t = time.perf_counter_ns()
            await c.request("login", name=f"{o.prefix}{c.index}", password=o.password)
            login_ns.append(time.perf_counter_ns() - t)
            done += 1
            if not o.quiet and done % 2000 == 0:
                progress(f"bench idle: {done} logged in ({time.perf_counter() - t2:.1f} s)")

        login_results = await gather_limited([login(c) for c in conns], SETUP_PARALLEL)
        login_failures = [r for r in login_results if isinstance(r, BaseException)]
        errors.update(_error_kind("connect", r) for r in connect_failures)
        errors.update(_error_kind("login", r) for r in login_failures)
        login_s = time.perf_counter() - t2
        say(f"bench idle: {len(conns) - len(login_failures)} logged in in {login_s:.1f} s"
            + (f", {len(login_failures)} failed ({login_failures[0]!r})" if login_failures else ""))
        await asyncio.sleep(o.settle)
        rss_logged_in = server_rss(proc)
        own_logged_in = me.memory_info().rss
        if o.hold > 0:
            say(f"bench idle: holding {len(conns)} idle connections for {o.hold:g} s")
            await asyncio.sleep(o.hold)
        rss_end = server_rss(proc)
        open_at_end = sum(1 for c in conns if not c.closed)
        logged_in = len(conns) - len(login_failures)
        if connect_failures or login_failures or open_at_end < len(conns):
            status = 1
    finally:
        stop.set()
        keeper.cancel()
        await gather_limited([c.aclose() for c in conns], 1000)

    n = max(len(conns), 1)
    login_lat = LatencySummary.of(login_ns)
    lost = len(conns) - open_at_end
    if lost:
        errors["disconnect"] += lost
    per_conn = (rss_connected - rss_base) / n / 1024 if rss_base is not None and rss_connected is not None else None
    per_session = ((rss_logged_in - rss_base) / n / 1024
                   if rss_base is not None and rss_logged_in is not None else None)
    own_per_conn = (own_logged_in - own_base) / n / 1024
    rows = [
        ("target", f"{host}:{port} ({o.transport}), server pid {pid or '-'}"),
        ("connections", f"{len(conns)} of {o.users} (connect {connect_s:.1f} s); logged in {logged_in} "
                        f"(login {login_s:.1f} s); still open at the end {open_at_end}"),
        ("server RSS before", _kib(rss_base)),
        ("server RSS connected", _kib(rss_connected)),
        ("server RSS logged in", _kib(rss_logged_in) + (f" (after {o.hold:g} s: {_kib(rss_end)})" if o.hold else "")),
        ("KiB/connection", "-" if per_conn is None else f"{per_conn:.1f} (connected, not logged in)"),
        ("KiB/session", "-" if per_session is None else f"{per_session:.1f} (connected and logged in)"),
        ("bench KiB/conn", f"{own_per_conn:.1f} (this process)"),
        ("login latency ms", login_lat.short()),
        ("errors", errors.text()),
    ]
    print(table(rows, "clusterchat bench idle"))
    if o.json_path:
        write_json(o.json_path, {
            "bench": "idle", "users": o.users, "connected": len(conns), "logged_in": logged_in,
            "open_at_end": open_at_end, "transport": o.transport, "target": f"{host}:{port}", "server_pid": pid,
            "register_s": round(register_s, 2), "connect_s": round(connect_s, 2), "login_s": round(login_s, 2),
            "server_rss_before": rss_base, "server_rss_connected": rss_connected,
            "server_rss_logged_in": rss_logged_in, "server_rss_end": rss_end,
            "kib_per_connection": None if per_conn is None else round(per_conn, 2),
            "kib_per_session": None if per_session is None else round(per_session, 2),
            "bench_kib_per_connection": round(own_per_conn, 2),
            "login_latency_ms": login_lat.as_dict(), "errors": dict(errors),
        })
    if pid is None:
        print("bench idle: no server pid (give --server-pid): no memory figures", file=sys.stderr)
    return status
