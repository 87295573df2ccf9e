"""`clusterchat bench login`: logins a second, and how long a login takes.

This module owns the login benchmark: N users registered in setup (names `PREFIX0`..,
reused by later runs), then `--concurrency` workers, each on its own connection, log in
over and over for `--warmup` + `--duration` seconds — then log out and in again on the
same connection, or (`--reconnect`) close it and open a new one for the next login.
Worker K cycles through the users K, K+C, K+2C, ... so no two workers ever hold the same
user (a second login would kick the first). Closed loop: a worker's next login follows
its previous one; open loop (`--rate`): the n-th login of the run is due n/RATE seconds
after the start, and its latency counts from then, so a slow server's queueing shows.

A login is argon2-bound on the node: the figure depends on `--argon2-memory` there, and
the node's per-connection `--rate-limit` (default 50/s) must not be what is measured —
start it with `--rate-limit 0`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusterchat.bench.conn import (
    BenchConn,
    ConnectionLost,
    connect,
    keepalive,
    register_names,
    source_address,
)
from clusterchat.bench.measure import every_second, measured_window, preflight, write_outputs
from clusterchat.bench.stats import (
    ErrorCounts,
    LatencyLog,
    LatencySummary,
    cpu_text,
    fmt_rate,
    progress,
    table,
)

perf_counter_ns = time.perf_counter_ns

REGISTER_POOL = 50


@dataclass(slots=True)
class LoginOptions:
    targets: list[tuple[str, int]]
    users: int
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: int = 10
    rate: float | None = None  # logins a second in total (open loop); None: closed loop
    reconnect: bool = False  # a new connection for every login instead of logout
    transport: str = "tcp"
    prefix: str = "login"
    password: str = "benchpass"
    timeout: float = 30.0  # a request unanswered this long counts as an error
    drain: float = 5.0  # wait this long for the logins in flight at the end
    per_source: int = 20000
    json_path: str | None = None
    plot_path: str | None = None
    quiet: bool = False
    server_pids: list[int] = field(default_factory=list)
    ping_interval: float = 30.0  # a slow open loop leaves connections idle: ping within the node's idle timeout


class LoginRun:
    def __init__(self, options: LoginOptions) -> None:
        self.options = options
        self.latency = LatencyLog()  # login request (or, open loop, its due time) to its reply
        self.connect_latency = LatencyLog()  # TCP connect (+ WebSocket handshake) of every connection opened
        self.errors = ErrorCounts()
        self.sending = False
        self.attempts = 0
        self.ok = 0
        self.in_flight = 0
        self.opened = 0  # connections opened so far, for their source addresses
        self.tickets = itertools.count()  # open loop: the n-th login of the run
        self.conns: dict[int, LoginConn] = {}  # worker -> its open connection


class LoginConn(BenchConn):
    __slots__ = ("run",)

    def __init__(self, run: LoginRun, index: int, websocket: bool) -> None:
        super().__init__(index, websocket)
        self.run = run

    def on_setup_event(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "kicked":
            self.run.errors["event:kicked"] += 1
        elif event == "error":
            self.run.errors["event:" + (msg.get("error") or {}).get("code", "?")] += 1


async def _open(run: LoginRun, k: int) -> LoginConn:
    o = run.options
    websocket = o.transport == "ws"
    host, port = o.targets[(k + run.opened) % len(o.targets)]
    i = run.opened
    run.opened += 1
    t0 = perf_counter_ns()
    conn = await connect(lambda: LoginConn(run, k, websocket), host, port, websocket=websocket,
                         local_addr=source_address(i, i + 1, host, o.per_source), wait_s=o.timeout)
    run.connect_latency.samples.append(perf_counter_ns() - t0)
    return conn


async def _worker(run: LoginRun, k: int, t_start_ns: int) -> None:
    o = run.options
    names = [f"{o.prefix}{i}" for i in range(k, o.users, o.concurrency)]
    errors = run.errors
    conn: LoginConn | None = None
    try:
        for j in itertools.count():
            if not run.sending:
                break
            due_ns = None
            if o.rate:
                due_ns = t_start_ns + int(next(run.tickets) * 1e9 / o.rate)
                delay = (due_ns - perf_counter_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                if not run.sending:
                    break
            try:
                if conn is None or conn.closed:
                    conn = run.conns[k] = await _open(run, k)
                t0 = perf_counter_ns() if due_ns is None else due_ns
                run.attempts += 1
                run.in_flight += 1
                try:
                    reply = await conn.raw_request("login", wait_s=o.timeout, name=names[j % len(names)],
                                                   password=o.password)
                finally:
                    run.in_flight -= 1
                if reply.get("ok"):
                    run.latency.samples.append(perf_counter_ns() - t0)
                    run.ok += 1
                else:
                    errors["login:" + (reply.get("error") or {}).get("code", "?")] += 1
                if o.reconnect:
                    await conn.aclose()
                    conn = None
                elif reply.get("ok"):
                    bye = await conn.raw_request("logout", wait_s=o.timeout)
                    if not bye.get("ok"):  # still logged in: the next login would be refused
                        errors["logout:" + (bye.get("error") or {}).get("code", "?")] += 1
                        await conn.aclose()
                        conn = None
            except ConnectionLost:
                errors["disconnect"] += 1
                conn = None
            except TimeoutError:
                errors["timeout"] += 1
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()  # its replies are out of step now
                conn = None
            except OSError as exc:
                errors[f"connect:{type(exc).__name__}"] += 1
                conn = None
                await asyncio.sleep(0.1)  # a refused connection fails at once: don't spin
    finally:
        run.conns.pop(k, None)
        if conn is not None:
            await conn.aclose()


def _progress_of(run: LoginRun) -> Callable[[dict[str, Any], float], str]:
    def complete(point: dict[str, Any], dt: float) -> str:
        point.update(logins_per_s=round(point["count"] / dt, 1), in_flight=run.in_flight,
                     errors=sum(run.errors.values()))
        return (f"logins {fmt_rate(point['logins_per_s']):>6}/s  p50 {point['p50_ms']:7.2f} ms  "
                f"p99 {point['p99_ms']:7.2f} ms  in flight {run.in_flight:4d}  errors {point['errors']}")

    return complete


async def run_login(o: LoginOptions) -> int:
    if o.concurrency < 1 or o.users < o.concurrency:
        print("bench login: --concurrency must be at least 1 and at most --users (a user is never logged in "
              "twice at once)", file=sys.stderr)
        return 2
    cpu = preflight("bench login", o.concurrency + REGISTER_POOL, o.plot_path, o.server_pids)
    if cpu is None:
        return 2
    run = LoginRun(o)
    t0 = time.perf_counter()
    try:
        created, existing = await register_names(o.targets, [f"{o.prefix}{i}" for i in range(o.users)], o.password,
                                                 websocket=o.transport == "ws", pool=REGISTER_POOL)
    except Exception as exc:
        print(f"bench login: registering the users failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    setup_s = time.perf_counter() - t0
    mode = (f"closed loop, {o.concurrency} concurrent" if not o.rate
            else f"open loop, {o.rate:g} logins/s (at most {o.concurrency} concurrent)")
    cycle = "a new connection for every login" if o.reconnect else "log out and in again on the same connection"
    if not o.quiet:
        progress(f"bench login: {o.users} users ready in {setup_s:.1f} s ({created} registered, {existing} already "
                 f"there); {mode}; {cycle}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    series: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    run.sending = True
    t_start_ns = perf_counter_ns()
    workers = [loop.create_task(_worker(run, k, t_start_ns)) for k in range(o.concurrency)]
    reporter = loop.create_task(every_second(run.latency, t_start, o.warmup, o.duration, stop, series, o.quiet,
                                             _progress_of(run)))
    keeper = loop.create_task(keepalive(run.conns.values(), o.ping_interval, stop))
    try:
        window_s = await measured_window(o.warmup, o.duration, (run.latency,), cpu, t_start)
        run.sending = False
        _done, pending = await asyncio.wait(workers, timeout=o.drain)
        for task in pending:
            task.cancel()
        for r in await asyncio.gather(*workers, return_exceptions=True):
            if isinstance(r, Exception):  # a bug of ours: count it, and say what it was
                run.errors[f"bench:{type(r).__name__}"] += 1
                print(f"bench login: a worker failed: {r!r}", file=sys.stderr)
        stop.set()
        await reporter
    finally:
        run.sending = False
        for task in [*workers, reporter, keeper]:
            task.cancel()
        await asyncio.gather(*workers, reporter, keeper, return_exceptions=True)

    measured = window_s[1] - window_s[0]
    window = run.latency.window()
    lat = LatencySummary.of(window)
    conn_lat = LatencySummary.of(run.connect_latency.samples)
    logins_per_s = len(window) / measured if measured > 0 else 0.0
    cpu_use = cpu.result()
    if cpu_use is not None and o.server_pids and len(window):
        cpu_use["server_us_per_login"] = round(cpu_use["server_cpu_s"] / len(window) * 1e6, 1)
    result: dict[str, Any] = {
        "bench": "login", "users": o.users, "registered": created, "concurrency": o.concurrency,
        "transport": o.transport, "targets": [f"{h}:{p}" for h, p in o.targets],
        "mode": "open" if o.rate else "closed", "rate": o.rate, "reconnect": o.reconnect,
        "duration_s": o.duration, "warmup_s": o.warmup, "measured_s": round(measured, 3),
        "window_s": [round(window_s[0], 3), round(window_s[1], 3)],
        "setup_s": round(setup_s, 2), "attempts": run.attempts, "logins_ok": run.ok,
        "logins_in_window": len(window), "logins_per_s": round(logins_per_s, 1),
        "latency_ms": lat.as_dict(), "connect_latency_ms": conn_lat.as_dict(), "connections": run.opened,
        "errors": dict(run.errors), "cpu": cpu_use, "series": series,
    }
    rows = [
        ("users", f"{o.users} ({created} registered now), {_n(o.concurrency, 'connection')} over "
                  f"{_n(len(o.targets), 'target')}, {o.transport}"),
        ("mode", f"{mode}; {cycle}"),
        ("measured", f"{measured:.1f} s after {o.warmup:g} s warmup (setup {setup_s:.1f} s)"),
        ("logins (ok)", f"{run.ok}  (attempts {run.attempts}; {len(window)} in the window)"),
        ("logins/s", f"{logins_per_s:,.1f}"),
        ("latency ms", lat.short()),
        ("connect ms", (conn_lat.short() if conn_lat.count else "-") + f"  ({_n(run.opened, 'connection')} opened)"),
        ("cpu", cpu_text(cpu_use, "login")),
        ("errors", run.errors.text()),
    ]
    print(table(rows, "clusterchat bench login"))
    title = f"bench login: {o.users} users, {mode}, {o.transport}; {logins_per_s:,.1f} logins/s"
    status = 0 if write_outputs("bench login", result, o.json_path, o.plot_path, title, window, "logins_per_s",
                                "logins/s") else 1
    if run.errors:
        print(f"LOGIN ERRORS: {run.errors.text()}", file=sys.stderr)
        status = 1
    if not len(window):
        print("NO LOGIN SUCCEEDED in the measured window", file=sys.stderr)
        status = 1
    return status


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


__all__ = ["LoginOptions", "run_login"]
