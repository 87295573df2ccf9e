"""`clusterchat bench direct`: friend pairs sending direct messages to each other.

This module owns the direct-message benchmark: setting up N users as N/2 friend pairs
(register, login, befriend, clear leftovers of earlier runs), driving the load — closed
loop (each user keeps `--window` sends outstanding) or open loop (a fixed aggregate
`--rate`, evenly paced or Poisson) — the receive path (latency, duplicates, order, acks),
the per-second progress line, the drain, and the final report.

Every message's text is `RUN SENDER COUNTER SEND_NS [padding]`: RUN tells this run's
messages from leftovers of earlier runs, SENDER and COUNTER make its unique id, SEND_NS
is `time.perf_counter_ns()` when it was sent (or, in the open loop, when it was due, so a
stalled server cannot hide its queueing). The cmid is `RUN-SENDER-COUNTER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusterchat.bench.conn import (
    BenchConn,
    ConnectionLost,
    Frame,
    RequestFailed,
    connect,
    gather_limited,
    keepalive,
    raise_nofile_limit,
    source_address,
)
from clusterchat.bench.stats import (
    CpuProbe,
    ErrorCounts,
    LatencyLog,
    LatencySummary,
    SenderLedger,
    account_losses,
    fmt_rate,
    progress,
    table,
    write_json,
)

perf_counter_ns = time.perf_counter_ns

SETUP_PARALLEL = 50
CONNECT_PARALLEL = 200


@dataclass(slots=True)
class DirectOptions:
    targets: list[tuple[str, int]]
    users: int
    duration: float
    warmup: float = 2.0
    rate: float | None = None
    window: int = 1
    arrival: str = "uniform"  # or "poisson" (open loop)
    transport: str = "tcp"
    prefix: str = "bench"
    password: str = "benchpass"
    size: int = 0  # pad message texts to at least this many characters
    drain: float = 5.0
    per_source: int = 20000
    json_path: str | None = None
    quiet: bool = False
    server_pids: list[int] = field(default_factory=list)
    ping_interval: float = 30.0
    ack_every: int = 100  # ack at once when this many messages are unacknowledged
    ack_interval: float = 0.05  # otherwise ack what arrived every this many seconds

    @property
    def closed_loop(self) -> bool:
        return not self.rate


class Setup(Exception):
    """Setup failed; the message says why."""


class DirectRun:
    """Shared state of one run; the users' hot paths update it."""

    def __init__(self, options: DirectOptions) -> None:
        self.options = options
        self.run_id = secrets.token_hex(3)
        self.latency = LatencyLog()
        self.reply_latency = LatencyLog()
        self.errors = ErrorCounts()
        self.received: set[int] = set()
        self.duplicated = 0
        self.reordered = 0
        self.stale = 0
        self.sending = False
        self.closed_loop = options.closed_loop
        self.sent = 0
        self.ok = 0
        self.outstanding = 0
        self.disconnects = 0
        self.closing = False
        self.ack_dirty: set[DirectUser] = set()
        self.pad = (" " + "x" * max(0, options.size - 40)) if options.size > 40 else ""
        self.users: list[DirectUser] = []
        self.ack_every = max(1, options.ack_every)
        self.acks = 0


class DirectUser(BenchConn):
    __slots__ = ("_fmt", "acked_seq", "friends", "last_counter", "ledger", "max_seq", "name", "partner_id",
                 "run", "user_id")

    def __init__(self, run: DirectRun, index: int, websocket: bool) -> None:
        super().__init__(index, websocket)
        self.run = run
        self.ledger = SenderLedger(index)
        self.name = f"{run.options.prefix}{index}"
        self.user_id = 0
        self.partner_id = 0
        self.friends: set[int] = set()
        self.max_seq = 0
        self.acked_seq = 0
        self.last_counter = 0
        self._fmt = b""

    def prepare(self, partner_id: int) -> None:
        self.partner_id = partner_id
        run = self.run
        text = f'{{"op":"send","rid":%d,"to":{partner_id},"cmid":"{run.run_id}-{self.index}-%d",' \
               f'"text":"{run.run_id} {self.index} %d %d{run.pad}"}}'
        self._fmt = text.encode()

    # ---- load: sending ------------------------------------------------------------

    def next_send(self, t_ns: int) -> bytes:
        ledger = self.ledger
        c = ledger.next_counter
        ledger.next_counter = c + 1
        ledger.pending[c] = t_ns
        run = self.run
        run.sent += 1
        run.outstanding += 1
        return self._fmt % (c, c, c, t_ns)

    def start_sending(self, window: int) -> None:
        now = perf_counter_ns()
        self.send_frames([self.next_send(now) for _ in range(window)])

    # ---- load: receiving (the hot path) ---------------------------------------------

    def on_load_frames(self, frames: list[Frame]) -> None:
        run = self.run
        now = perf_counter_ns()
        out: list[bytes] | None = None
        for f in frames:
            ev = f.event
            if ev is None:
                if f.op == "send":
                    rid = f.rid
                    t0 = self.ledger.pending.pop(rid, None)  # type: ignore[arg-type]
                    if t0 is not None:
                        run.outstanding -= 1
                    if f.ok:
                        run.ok += 1
                        if t0 is not None:
                            run.reply_latency.samples.append(now - t0)
                    else:
                        self.ledger.failed.add(rid)  # type: ignore[arg-type]
                        run.errors["send:" + (f.error.code if f.error else "?")] += 1
                    if run.closed_loop and run.sending:
                        if out is None:
                            out = []
                        out.append(self.next_send(now))
                elif not f.ok:
                    run.errors[f"{f.op}:" + (f.error.code if f.error else "?")] += 1
            elif ev == "message":
                parts = f.text.split(" ", 4)  # type: ignore[union-attr]
                if parts[0] != run.run_id:
                    run.stale += 1
                else:
                    counter = int(parts[2])
                    key = (int(parts[1]) << 32) | counter
                    received = run.received
                    if key in received:
                        run.duplicated += 1
                    else:
                        received.add(key)
                        run.latency.samples.append(now - int(parts[3]))
                        if counter < self.last_counter:
                            run.reordered += 1
                        else:
                            self.last_counter = counter
                seq = f.seq or 0
                if seq > self.max_seq:
                    self.max_seq = seq
                if self.max_seq - self.acked_seq >= run.ack_every:
                    if out is None:
                        out = []
                    out.append(b'{"op":"ack","seq":%d}' % self.max_seq)
                    self.acked_seq = self.max_seq
                    run.acks += 1
                else:
                    run.ack_dirty.add(self)
            elif ev == "error":
                run.errors["event:" + (f.error.code if f.error else "?")] += 1
        if out:
            self.send_frames(out)

    def flush_ack(self) -> None:
        if self.max_seq > self.acked_seq and not self.closed:
            self.acked_seq = self.max_seq
            self.run.acks += 1
            self.send_frame(b'{"op":"ack","seq":%d}' % self.max_seq)

    # ---- setup ----------------------------------------------------------------------

    def on_setup_event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "message":
            self.run.stale += 1
            seq = msg.get("seq") or 0
            if seq > self.max_seq:
                self.max_seq = seq

    def on_lost(self, exc: Exception | None) -> None:
        if not self.run.closing and (self.run.sending or self.user_id):
            self.run.disconnects += 1
            self.run.errors["disconnect"] += 1
        self.run.ack_dirty.discard(self)


# ---------------------------------------------------------------------------- setup


async def _register(u: DirectUser, password: str) -> None:
    reply = await u.raw_request("register", name=u.name, password=password)
    if not reply.get("ok") and (reply.get("error") or {}).get("code") != "name_taken":
        raise RequestFailed("register", reply)


async def _login(u: DirectUser, password: str) -> None:
    reply = await u.request("login", name=u.name, password=password)
    u.user_id = reply["user"]["id"]
    u.friends = {f["id"] for f in reply.get("friends", ())}
    offline = reply.get("offline") or []
    u.run.stale += len(offline)
    for m in offline:
        u.max_seq = max(u.max_seq, m.get("seq", 0))
    more = bool(reply.get("more"))
    while more:  # the session holds live events until we sync
        page = await u.request("sync", after=u.max_seq, limit=100)
        msgs = page.get("messages") or []
        u.run.stale += len(msgs)
        for m in msgs:
            u.max_seq = max(u.max_seq, m.get("seq", 0))
        more = bool(page.get("more")) and bool(msgs)
        if u.max_seq > u.acked_seq:
            await u.request("ack", seq=u.max_seq)
            u.acked_seq = u.max_seq


async def _befriend(a: DirectUser, b: DirectUser) -> None:
    if b.user_id in a.friends:
        return
    try:
        await a.request("friend_request", user_id=b.user_id, note="bench")
    except RequestFailed as exc:
        if exc.code != "already_friends":
            raise
    try:
        await b.request("friend_accept", user_id=a.user_id)
    except RequestFailed as exc:
        if exc.code != "already_friends":
            raise


async def _clear_inbox(u: DirectUser) -> None:
    if u.max_seq > u.acked_seq:
        seq = u.max_seq
        await u.request("ack", seq=seq)
        u.acked_seq = max(u.acked_seq, seq)


def _check(results: list[Any], what: str) -> None:
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        kinds: dict[str, int] = {}
        for f in failures:
            key = f"{type(f).__name__}: {f}"[:160]
            kinds[key] = kinds.get(key, 0) + 1
        detail = "; ".join(f"{k} (x{n})" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5])
        raise Setup(f"{what} failed for {len(failures)} of {len(results)}: {detail}")


async def setup_users(run: DirectRun) -> list[DirectUser]:
    o = run.options
    websocket = o.transport == "ws"

    async def open_one(i: int) -> DirectUser:
        host, port = o.targets[i % len(o.targets)]
        return await connect(lambda: DirectUser(run, i, websocket), host, port, websocket=websocket,
                             local_addr=source_address(i, o.users, host, o.per_source))

    results = await gather_limited([open_one(i) for i in range(o.users)], CONNECT_PARALLEL)
    users = [r for r in results if isinstance(r, DirectUser)]
    run.users.extend(users)
    _check(results, "connecting")
    _check(await gather_limited([_register(u, o.password) for u in users], SETUP_PARALLEL), "register")
    _check(await gather_limited([_login(u, o.password) for u in users], SETUP_PARALLEL), "login")
    pairs = [(users[i], users[i + 1]) for i in range(0, len(users), 2)]
    _check(await gather_limited([_befriend(a, b) for a, b in pairs], SETUP_PARALLEL), "befriending")
    for a, b in pairs:
        a.prepare(b.user_id)
        b.prepare(a.user_id)
    await asyncio.sleep(0.2)  # let friend/presence events and stragglers of earlier runs arrive
    _check(await gather_limited([_clear_inbox(u) for u in users], SETUP_PARALLEL), "acknowledging leftovers")
    return users


# ---------------------------------------------------------------------------- load


async def _ack_loop(run: DirectRun, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(run.options.ack_interval)
        dirty = run.ack_dirty
        if dirty:
            run.ack_dirty = set()
            for u in dirty:
                u.flush_ack()


async def _pacer(run: DirectRun, rate: float, poisson: bool) -> None:
    """Open loop: `rate` sends a second in total, round-robin over the users."""
    users = [u for u in run.users if not u.closed]
    n = len(users)
    interval = 1e9 / rate
    expovariate = random.Random(12345).expovariate

    def gap() -> float:
        return expovariate(1.0) * interval if poisson else interval

    i = 0
    due = float(perf_counter_ns())
    touched: dict[DirectUser, list[bytes]] = {}
    while run.sending:
        now = perf_counter_ns()
        while due <= now:
            u = users[i]
            i += 1
            if i == n:
                i = 0
            if not u.closed:
                frames = touched.get(u)
                if frames is None:
                    touched[u] = frames = []
                frames.append(u.next_send(int(due)))
            due += gap()
        for u, frames in touched.items():
            u.send_frames(frames)
        touched.clear()
        # Ticks of at least 1 ms: sends due within a tick go out together, stamped with their due time.
        await asyncio.sleep(min(max((due - perf_counter_ns()) / 1e9, 0.001), 0.01))


async def _progress(run: DirectRun, t_start: float, series: list[dict[str, Any]], stop: asyncio.Event,
                    quiet: bool) -> None:
    last_ok = 0
    last_time = time.perf_counter()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        now = time.perf_counter()
        dt = max(now - last_time, 1e-9)
        last_time = now
        recent = run.latency.tick()
        run.reply_latency.tick()
        ok = run.ok
        s = LatencySummary.of(recent)
        point = {"t": round(now - t_start, 2), "sent_per_s": round((ok - last_ok) / dt, 1),
                 "recv_per_s": round(len(recent) / dt, 1), "p50_ms": round(s.p50, 3), "p99_ms": round(s.p99, 3),
                 "outstanding": run.outstanding, "errors": sum(run.errors.values())}
        last_ok = ok
        series.append(point)
        if not quiet:
            phase = "warmup" if run.latency.window_start is None else (
                "drain" if not run.sending else "measure")
            progress(f"[{point['t']:6.1f}s {phase:7}] sent {fmt_rate(point['sent_per_s']):>7}/s  "
                     f"recv {fmt_rate(point['recv_per_s']):>7}/s  p50 {s.p50:7.2f} ms  p99 {s.p99:7.2f} ms  "
                     f"outstanding {run.outstanding:6d}  errors {point['errors']}")


async def run_direct(o: DirectOptions) -> int:
    if o.users < 2 or o.users % 2:
        print("bench direct: --users must be an even number of at least 2", file=sys.stderr)
        return 2
    if o.window < 1:
        print("bench direct: --window must be at least 1", file=sys.stderr)
        return 2
    limit = raise_nofile_limit()
    if o.users + 64 > limit:
        print(f"bench direct: {o.users} connections need more open files than the limit of {limit}",
              file=sys.stderr)
        return 2
    try:
        cpu = CpuProbe(o.server_pids)
    except Exception as exc:
        print(f"bench direct: cannot watch the server pids {o.server_pids}: {exc}", file=sys.stderr)
        return 2
    run = DirectRun(o)
    t0 = time.perf_counter()
    stop_keepalive = asyncio.Event()
    # Setup can outlast the node's idle timeout (thousands of argon2 hashes); so can a slow open loop.
    keeper = asyncio.get_running_loop().create_task(keepalive(run.users, o.ping_interval, stop_keepalive))
    try:
        try:
            users = await setup_users(run)
        except Setup as exc:
            print(f"bench direct: {exc}", file=sys.stderr)
            return 1
        setup_s = time.perf_counter() - t0
        if not o.quiet:
            progress(f"bench direct: {len(users)} users ready in {setup_s:.1f} s (run {run.run_id}, "
                     f"{run.stale} leftover messages cleared); "
                     + (f"closed loop, window {o.window}" if o.closed_loop else
                        f"open loop, {o.rate:g} msgs/s {o.arrival}"))
        return await _load(run, users, setup_s, cpu)
    finally:
        run.closing = True
        stop_keepalive.set()
        keeper.cancel()
        await asyncio.gather(*(u.aclose() for u in run.users), return_exceptions=True)


async def _load(run: DirectRun, users: list[DirectUser], setup_s: float, cpu: CpuProbe) -> int:
    o = run.options
    loop = asyncio.get_running_loop()
    for u in users:
        u.start_load()
    stop = asyncio.Event()
    series: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    run.sending = True
    tasks = [loop.create_task(_ack_loop(run, stop)), loop.create_task(_progress(run, t_start, series, stop, o.quiet))]
    if o.closed_loop:
        for u in users:
            u.start_sending(o.window)
    else:
        assert o.rate is not None
        tasks.append(loop.create_task(_pacer(run, o.rate, o.arrival == "poisson")))

    marks: dict[str, float] = {}

    def mark(name: str, action: Callable[[], None]) -> None:
        marks[name] = time.perf_counter()
        action()

    def open_window() -> None:
        run.latency.start_window()
        run.reply_latency.start_window()
        cpu.start()

    def close_window() -> None:
        run.latency.end_window()
        run.reply_latency.end_window()
        cpu.stop()

    loop.call_later(o.warmup, mark, "window_start", open_window)
    await asyncio.sleep(o.warmup + o.duration)
    mark("window_end", close_window)
    ok_at_start = run.ok
    run.sending = False

    # Drain: every reply, every confirmed message, or give up after `drain` seconds.
    deadline = time.perf_counter() + o.drain
    while time.perf_counter() < deadline:
        if run.outstanding <= 0 and len(run.received) >= run.ok:
            break
        if all(u.closed for u in users):
            break
        await asyncio.sleep(0.05)
    drain_s = time.perf_counter() - marks["window_end"]
    for u in users:
        u.flush_ack()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)  # let the last ack replies come back

    losses = account_losses((u.ledger for u in users), run.received, run.duplicated)
    measured = marks["window_end"] - marks.get("window_start", t_start)
    window = run.latency.window()
    lat = LatencySummary.of(window)
    reply = LatencySummary.of(run.reply_latency.window())
    msgs_per_s = len(window) / measured if measured > 0 else 0.0
    cpu_use = cpu.result()
    if cpu_use is not None and o.server_pids and len(window):
        cpu_use["server_us_per_msg"] = round(cpu_use["server_cpu_s"] / len(window) * 1e6, 1)
    mode = f"closed loop, window {o.window}" if o.closed_loop else f"open loop, {o.rate:g}/s {o.arrival}"
    result: dict[str, Any] = {
        "bench": "direct", "run_id": run.run_id, "users": len(users), "transport": o.transport,
        "targets": [f"{h}:{p}" for h, p in o.targets], "mode": "closed" if o.closed_loop else "open",
        "window": o.window if o.closed_loop else None, "rate": o.rate, "arrival": None if o.closed_loop else o.arrival,
        "duration_s": o.duration, "warmup_s": o.warmup, "measured_s": round(measured, 3),
        "setup_s": round(setup_s, 2), "drain_s": round(drain_s, 2),
        "sent": losses.sent, "sent_ok": losses.confirmed, "send_failed": losses.failed,
        "unanswered": losses.unanswered, "received": losses.received,
        "received_in_window": len(window), "msgs_per_s": round(msgs_per_s, 1),
        "latency_ms": lat.as_dict(), "reply_latency_ms": reply.as_dict(),
        "errors": dict(run.errors), "lost": losses.lost, "duplicated": losses.duplicated,
        "reordered": run.reordered, "stale": run.stale, "acks": run.acks, "disconnects": run.disconnects,
        "sent_ok_before_drain": ok_at_start, "cpu": cpu_use, "series": series,
    }
    rows = [
        ("users", f"{len(users)} over {len(o.targets)} target(s), {o.transport}"),
        ("mode", mode),
        ("measured", f"{measured:.1f} s after {o.warmup:g} s warmup (setup {setup_s:.1f} s, drain {drain_s:.1f} s)"),
        ("sent (ok)", f"{losses.confirmed}  (requests {losses.sent}, failed {losses.failed}, "
                      f"unanswered {losses.unanswered})"),
        ("received", str(losses.received)),
        ("msgs/s", f"{msgs_per_s:,.0f}  ({len(window)} received in the window)"),
        ("latency ms", lat.short() if lat.count else "-"),
        ("reply latency ms", reply.short() if reply.count else "-"),
        ("acks", f"{run.acks} ({run.acks / max(losses.received, 1):.2f} a message; every {o.ack_interval:g} s "
                 f"or {run.ack_every} messages)"),
        ("cpu", _cpu_text(cpu_use)),
        ("errors", run.errors.text()),
        ("lost", str(losses.lost)),
        ("duplicated", str(losses.duplicated)),
        ("reordered", str(run.reordered)),
    ]
    print(table(rows, f"clusterchat bench direct (run {run.run_id})"))
    if o.json_path:
        write_json(o.json_path, result)
    status = 0
    if losses.duplicated:
        print(f"DUPLICATED {losses.duplicated} MESSAGES", file=sys.stderr)
    if losses.lost:
        print(f"LOST {losses.lost} MESSAGES (e.g. {', '.join(losses.lost_examples[:5])})")
        print(f"LOST {losses.lost} MESSAGES", file=sys.stderr)
        status = 3
    if run.disconnects:
        print(f"DISCONNECTED {run.disconnects} CONNECTIONS during the run", file=sys.stderr)
        status = status or 4
    if not users:
        status = status or 1
    return status


def _cpu_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    parts = []
    if c["server_pct"]:
        parts.append("server " + "+".join(f"{x:.0f}%" for x in c["server_pct"])
                     + (f" ({c['server_us_per_msg']:.0f} us/msg)" if "server_us_per_msg" in c else ""))
    parts.append(f"bench {c['bench_pct']:.0f}%")
    parts.append(f"others {c['other_pct']:.0f}%" if c["server_pct"] else f"machine {c['machine_pct']:.0f}%")
    return ", ".join(parts) + f" (of {c['cores'] * 100}%)"


__all__ = ["ConnectionLost", "DirectOptions", "run_direct"]
