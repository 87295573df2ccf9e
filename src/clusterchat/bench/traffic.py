"""Message traffic between bench users: the machinery `bench direct` and `bench group` share.

This module owns everything of a messaging benchmark but the arrangement of its users:
the user connection and its hot path (send, reply, receive, ack), the setup every user
goes through (connect, register, login, clear leftovers of earlier runs), the closed loop
(each user keeps `--window` sends outstanding) and the open loop (a fixed aggregate
`--rate`, evenly paced or Poisson), the per-second progress line, the drain, the loss
accounting and the report (table, `--json`, `--plot`). A `Scenario` adds who talks to whom:
friend pairs (`direct.py`) or groups (`group.py`), and what each send is addressed to.

Every message's text is `RUN SENDER COUNTER SEND_NS [padding]`: RUN tells this run's
messages from leftovers of earlier runs, SENDER and COUNTER make its unique id, SEND_NS
is `time.perf_counter_ns()` when it was sent (or, in the open loop, when it was due, so a
stalled server cannot hide its queueing). The cmid is `RUN-SENDER-COUNTER`. A message
with several recipients is one delivery a recipient: latency, loss and duplicates are
counted per delivery.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from clusterchat.bench.conn import (
    BenchConn,
    Frame,
    RequestFailed,
    connect,
    gather_limited,
    keepalive,
    source_address,
)
from clusterchat.bench.measure import every_second, measured_window, preflight, write_outputs
from clusterchat.bench.stats import (
    Arrival,
    CpuProbe,
    ErrorCounts,
    LatencyLog,
    LatencySummary,
    ReceiverLedger,
    SenderLedger,
    account_losses,
    cpu_text,
    fmt_rate,
    progress,
    table,
)

perf_counter_ns = time.perf_counter_ns

SETUP_PARALLEL = 50
CONNECT_PARALLEL = 200


@dataclass(slots=True)
class TrafficOptions:
    targets: list[tuple[str, int]]
    users: int
    duration: float
    warmup: float = 2.0
    rate: float | None = None  # messages a second in total (open loop); None: closed loop
    window: int = 1
    arrival: str = "uniform"  # or "poisson" (open loop)
    transport: str = "tcp"
    prefix: str = "bench"
    password: str = "benchpass"
    size: int = 0  # pad message texts to at least this many characters
    drain: float = 5.0
    per_source: int = 20000
    json_path: str | None = None
    plot_path: str | None = None
    quiet: bool = False
    server_pids: list[int] = field(default_factory=list)
    ping_interval: float = 30.0
    ack_every: int = 100  # ack at once when this many messages are unacknowledged
    ack_interval: float = 0.05  # otherwise this long after the first unacknowledged delivery

    @property
    def closed_loop(self) -> bool:
        return not self.rate


class Setup(Exception):
    """Setup failed; the message says why."""


@dataclass(slots=True)
class Scenario:
    """What makes a messaging benchmark a particular one."""

    name: str  # "direct", "group": the command and the report's title
    send_op: str  # "send" or "group_send"
    fanout: int  # recipients of every message
    # After every user logged in: befriend or group the users, call `prepare()` on each
    # sender, and say how they are arranged (for the table, e.g. "10 friend pairs").
    arrange: Callable[[TrafficRun, list[TrafficUser]], Awaitable[str]]
    extra: dict[str, Any] = field(default_factory=dict)  # added to the JSON


class TrafficRun:
    """Shared state of one run; the users' hot paths update it."""

    def __init__(self, options: TrafficOptions, scenario: Scenario) -> None:
        self.options = options
        self.scenario = scenario
        self.send_op = scenario.send_op
        self.fanout = scenario.fanout
        self.run_id = secrets.token_hex(3)
        self.latency = LatencyLog()
        self.reply_latency = LatencyLog()
        self.errors = ErrorCounts()
        self.ledgers: list[SenderLedger] = []  # by user index
        self.deliveries = 0
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
        # Users with deliveries not yet acknowledged, in the order their first one arrived,
        # each with when it must be acked: every client acks on its own clock, as real ones
        # do, not all at once on one shared tick (that burst was what a run at half rate
        # mostly measured).
        self.ack_due: deque[tuple[int, TrafficUser]] = deque()
        self.ack_interval_ns = int(options.ack_interval * 1e9)
        self.pad = (" " + "x" * max(0, options.size - 40)) if options.size > 40 else ""
        self.users: list[TrafficUser] = []
        self.ack_every = max(1, options.ack_every)
        self.acks = 0


class TrafficUser(BenchConn):
    __slots__ = ("_fmt", "ack_queued", "acked_seq", "friends", "groups", "ledger", "max_seq", "name", "run", "seen",
                 "user_id")

    def __init__(self, run: TrafficRun, index: int, websocket: bool) -> None:
        super().__init__(index, websocket)
        self.run = run
        self.ledger = SenderLedger(index, run.fanout)
        self.seen = ReceiverLedger()
        self.name = f"{run.options.prefix}{index}"
        self.user_id = 0
        self.friends: set[int] = set()
        self.groups: dict[str, int] = {}  # name -> id, from the login reply
        self.max_seq = 0
        self.acked_seq = 0
        self.ack_queued = False  # in run.ack_due
        self._fmt = b""

    def prepare(self, address: str) -> None:
        """Address every send: `"to":ID` for a direct message, `"group_id":ID` for a group."""
        run = self.run
        text = f'{{"op":"{run.send_op}","rid":%d,{address},"cmid":"{run.run_id}-{self.index}-%d",' \
               f'"text":"{run.run_id} {self.index} %d %d{run.pad}"}}'
        self._fmt = text.encode()

    # ---- load: sending ------------------------------------------------------------

    def next_send(self, t_ns: int) -> bytes:
        c = self.ledger.next(t_ns)
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
                if f.op == run.send_op:
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
                        run.errors[f"{run.send_op}:" + (f.error.code if f.error else "?")] += 1
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
                    sender = int(parts[1])
                    counter = int(parts[2])
                    arrival = self.seen.arrived(sender, counter)
                    if arrival is Arrival.DUPLICATE:
                        run.duplicated += 1
                    else:
                        if arrival is Arrival.LATE:
                            run.reordered += 1
                        try:
                            run.ledgers[sender].delivered[counter] += 1
                        except IndexError:
                            run.errors["unknown_message"] += 1
                        run.deliveries += 1
                        run.latency.samples.append(now - int(parts[3]))
                seq = f.seq or 0
                if seq > self.max_seq:
                    self.max_seq = seq
                if self.max_seq - self.acked_seq >= run.ack_every:
                    if out is None:
                        out = []
                    out.append(b'{"op":"ack","seq":%d}' % self.max_seq)
                    self.acked_seq = self.max_seq
                    run.acks += 1
                elif not self.ack_queued:
                    self.ack_queued = True
                    run.ack_due.append((now + run.ack_interval_ns, self))
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


# ---------------------------------------------------------------------------- setup


async def _register(u: TrafficUser, password: str) -> None:
    reply = await u.raw_request("register", name=u.name, password=password)
    if not reply.get("ok") and (reply.get("error") or {}).get("code") != "name_taken":
        raise RequestFailed("register", reply)


async def _login(u: TrafficUser, password: str) -> None:
    reply = await u.request("login", name=u.name, password=password)
    u.user_id = reply["user"]["id"]
    u.friends = {f["id"] for f in reply.get("friends", ())}
    u.groups = {g["name"]: g["id"] for g in reply.get("groups", ())}
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


async def _clear_inbox(u: TrafficUser) -> None:
    if u.max_seq > u.acked_seq:
        seq = u.max_seq
        await u.request("ack", seq=seq)
        u.acked_seq = max(u.acked_seq, seq)


def check(results: list[Any], what: str) -> None:
    """Raise `Setup` naming the commonest failures if any of `results` is an exception."""
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        kinds: dict[str, int] = {}
        for f in failures:
            key = f"{type(f).__name__}: {f}"[:160]
            kinds[key] = kinds.get(key, 0) + 1
        detail = "; ".join(f"{k} (x{n})" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5])
        raise Setup(f"{what} failed for {len(failures)} of {len(results)}: {detail}")


async def each(coros: list[Any], what: str) -> list[Any]:
    """Run setup steps, SETUP_PARALLEL at a time; their results, or `Setup` naming the failures."""
    results = await gather_limited(coros, SETUP_PARALLEL)
    check(results, what)
    return results


async def setup_users(run: TrafficRun) -> tuple[list[TrafficUser], str]:
    """Connect, register and log in every user, arrange them, clear leftovers; the users and their shape."""
    o = run.options
    websocket = o.transport == "ws"

    async def open_one(i: int) -> TrafficUser:
        host, port = o.targets[i % len(o.targets)]
        return await connect(lambda: TrafficUser(run, i, websocket), host, port, websocket=websocket,
                             local_addr=source_address(i, o.users, host, o.per_source))

    results = await gather_limited([open_one(i) for i in range(o.users)], CONNECT_PARALLEL)
    users = [r for r in results if isinstance(r, TrafficUser)]
    run.users.extend(users)
    check(results, "connecting")
    run.ledgers = [u.ledger for u in users]
    await each([_register(u, o.password) for u in users], "register")
    await each([_login(u, o.password) for u in users], "login")
    shape = await run.scenario.arrange(run, users)
    await asyncio.sleep(0.2)  # let friend/group/presence events and stragglers of earlier runs arrive
    await each([_clear_inbox(u) for u in users], "acknowledging leftovers")
    return users, shape


# ---------------------------------------------------------------------------- load


async def _ack_loop(run: TrafficRun, stop: asyncio.Event) -> None:
    """Ack each user's deliveries `ack_interval` after the first of them arrived."""
    due = run.ack_due
    while not stop.is_set():
        now = perf_counter_ns()
        while due and due[0][0] <= now:
            u = due.popleft()[1]
            u.ack_queued = False
            u.flush_ack()
        # The head was queued at most `ack_interval` ago, so this never waits longer than that.
        wait = (due[0][0] - now) / 1e9 if due else run.options.ack_interval
        await asyncio.sleep(max(wait, 0.001))


async def _pacer(run: TrafficRun, rate: float, poisson: bool) -> None:
    """Open loop: `rate` sends a second in total, round-robin over the users."""
    users = [u for u in run.users if not u.closed]
    n = len(users)
    interval = 1e9 / rate
    expovariate = random.Random(12345).expovariate

    def gap() -> float:
        return expovariate(1.0) * interval if poisson else interval

    i = 0
    due = float(perf_counter_ns())
    touched: dict[TrafficUser, list[bytes]] = {}
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


def _progress_of(run: TrafficRun) -> Callable[[dict[str, Any], float], str]:
    last_ok = 0

    def complete(point: dict[str, Any], dt: float) -> str:
        nonlocal last_ok
        run.reply_latency.tick()
        ok = run.ok
        point.update(sent_per_s=round((ok - last_ok) / dt, 1), recv_per_s=round(point["count"] / dt, 1),
                     outstanding=run.outstanding, errors=sum(run.errors.values()))
        last_ok = ok
        return (f"sent {fmt_rate(point['sent_per_s']):>7}/s  recv {fmt_rate(point['recv_per_s']):>7}/s  "
                f"p50 {point['p50_ms']:7.2f} ms  p99 {point['p99_ms']:7.2f} ms  outstanding {run.outstanding:6d}  "
                f"errors {point['errors']}")

    return complete


def mode_text(o: TrafficOptions) -> str:
    return f"closed loop, window {o.window}" if o.closed_loop else f"open loop, {o.rate:g} msgs/s {o.arrival}"


async def run_traffic(o: TrafficOptions, scenario: Scenario) -> int:
    name = scenario.name
    if o.window < 1:
        print(f"bench {name}: --window must be at least 1", file=sys.stderr)
        return 2
    cpu = preflight(f"bench {name}", o.users, o.plot_path, o.server_pids)
    if cpu is None:
        return 2
    run = TrafficRun(o, scenario)
    t0 = time.perf_counter()
    stop_keepalive = asyncio.Event()
    # Setup can outlast the node's idle timeout (thousands of argon2 hashes); so can a slow open loop.
    keeper = asyncio.get_running_loop().create_task(keepalive(run.users, o.ping_interval, stop_keepalive))
    try:
        try:
            users, shape = await setup_users(run)
        except Setup as exc:
            print(f"bench {name}: {exc}", file=sys.stderr)
            return 1
        setup_s = time.perf_counter() - t0
        if not o.quiet:
            progress(f"bench {name}: {len(users)} users ready in {setup_s:.1f} s ({shape}; run {run.run_id}, "
                     f"{run.stale} leftover messages cleared); {mode_text(o)}")
        return await _load(run, users, shape, setup_s, cpu)
    finally:
        run.closing = True
        stop_keepalive.set()
        keeper.cancel()
        await asyncio.gather(*(u.aclose() for u in run.users), return_exceptions=True)


async def _load(run: TrafficRun, users: list[TrafficUser], shape: str, setup_s: float, cpu: CpuProbe) -> int:
    o = run.options
    loop = asyncio.get_running_loop()
    for u in users:
        u.start_load()
    stop = asyncio.Event()
    series: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    run.sending = True
    tasks = [loop.create_task(_ack_loop(run, stop)),
             loop.create_task(every_second(run.latency, t_start, o.warmup, o.duration, stop, series, o.quiet,
                                           _progress_of(run)))]
    if o.closed_loop:
        for u in users:
            u.start_sending(o.window)
    else:
        assert o.rate is not None
        tasks.append(loop.create_task(_pacer(run, o.rate, o.arrival == "poisson")))
    window_s = await measured_window(o.warmup, o.duration, (run.latency, run.reply_latency), cpu, t_start)
    ok_at_start = run.ok
    run.sending = False
    window_end = time.perf_counter()

    # Drain: every reply, every delivery a confirmed message owes, or give up after `drain` seconds.
    deadline = time.perf_counter() + o.drain
    while time.perf_counter() < deadline:
        if run.outstanding <= 0 and run.deliveries >= run.ok * run.fanout:
            break
        if all(u.closed for u in users):
            break
        await asyncio.sleep(0.05)
    drain_s = time.perf_counter() - window_end
    for u in users:
        u.flush_ack()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)  # let the last ack replies come back
    return _report(run, users, shape, setup_s, drain_s, window_s, ok_at_start, cpu, series)


def _report(run: TrafficRun, users: list[TrafficUser], shape: str, setup_s: float, drain_s: float,
            window_s: tuple[float, float], ok_at_start: int, cpu: CpuProbe, series: list[dict[str, Any]]) -> int:
    o = run.options
    sc = run.scenario
    fanout = run.fanout
    losses = account_losses((u.ledger for u in users), run.duplicated)
    measured = window_s[1] - window_s[0]
    window = run.latency.window()
    lat = LatencySummary.of(window)
    reply = LatencySummary.of(run.reply_latency.window())
    deliveries_per_s = len(window) / measured if measured > 0 else 0.0
    msgs_per_s = deliveries_per_s / fanout
    cpu_use = cpu.result()
    if cpu_use is not None and o.server_pids and len(window):
        cpu_use["server_us_per_msg"] = round(cpu_use["server_cpu_s"] / (len(window) / fanout) * 1e6, 1)
    result: dict[str, Any] = {
        "bench": sc.name, "run_id": run.run_id, "users": len(users), "transport": o.transport,
        "targets": [f"{h}:{p}" for h, p in o.targets], **sc.extra, "fanout": fanout,
        "mode": "closed" if o.closed_loop else "open",
        "window": o.window if o.closed_loop else None, "rate": o.rate, "arrival": None if o.closed_loop else o.arrival,
        "duration_s": o.duration, "warmup_s": o.warmup, "measured_s": round(measured, 3),
        "window_s": [round(window_s[0], 3), round(window_s[1], 3)],
        "setup_s": round(setup_s, 2), "drain_s": round(drain_s, 2),
        "sent": losses.sent, "sent_ok": losses.confirmed, "send_failed": losses.failed,
        "unanswered": losses.unanswered, "expected": losses.expected, "received": losses.received,
        "received_in_window": len(window), "msgs_per_s": round(msgs_per_s, 1),
        "deliveries_per_s": round(deliveries_per_s, 1),
        "latency_ms": lat.as_dict(), "reply_latency_ms": reply.as_dict(),
        "errors": dict(run.errors), "lost": losses.lost, "duplicated": losses.duplicated,
        "reordered": run.reordered, "stale": run.stale, "acks": run.acks, "disconnects": run.disconnects,
        "sent_ok_before_drain": ok_at_start, "cpu": cpu_use, "series": series,
    }
    deliveries = "" if fanout == 1 else " deliveries"
    rows = [
        ("users", f"{len(users)} over {len(o.targets)} target(s), {o.transport}; {shape}"),
        ("mode", mode_text(o)),
        ("measured", f"{measured:.1f} s after {o.warmup:g} s warmup (setup {setup_s:.1f} s, drain {drain_s:.1f} s)"),
        ("sent (ok)", f"{losses.confirmed}  (requests {losses.sent}, failed {losses.failed}, "
                      f"unanswered {losses.unanswered})"),
        ("received", f"{losses.received}" + (f" deliveries of {losses.expected} owed ({fanout} a message)"
                                               if fanout > 1 else "")),
        ("msgs/s", f"{msgs_per_s:,.0f}  ({len(window)}{deliveries} received in the window)"),
        *([("deliveries/s", f"{deliveries_per_s:,.0f}")] if fanout > 1 else []),
        ("latency ms", (lat.short() + ("  (send to receive, per delivery)" if fanout > 1 else "")) if lat.count
         else "-"),
        ("reply latency ms", reply.short() if reply.count else "-"),
        ("acks", f"{run.acks} ({run.acks / max(losses.received, 1):.2f} a {'delivery' if fanout > 1 else 'message'}; "
                 f"every {o.ack_interval:g} s or {run.ack_every} messages)"),
        ("cpu", cpu_text(cpu_use)),
        ("errors", run.errors.text()),
        ("lost", f"{losses.lost}{deliveries}"),
        ("duplicated", f"{losses.duplicated}{deliveries}"),
        ("reordered", str(run.reordered)),
    ]
    print(table(rows, f"clusterchat bench {sc.name} (run {run.run_id})"))
    title = f"bench {sc.name}: {len(users)} users, {shape}, {o.transport}, {mode_text(o)}; {msgs_per_s:,.0f} msgs/s"
    status = 0 if write_outputs(f"bench {sc.name}", result, o.json_path, o.plot_path, title, window, "recv_per_s",
                                "deliveries/s" if fanout > 1 else "messages received/s") else 1
    noun = "DELIVERIES" if fanout > 1 else "MESSAGES"
    if losses.duplicated:
        print(f"DUPLICATED {losses.duplicated} {noun}", file=sys.stderr)
    if losses.lost:
        print(f"LOST {losses.lost} {noun} (e.g. {', '.join(losses.lost_examples[:5])})")
        print(f"LOST {losses.lost} {noun}", file=sys.stderr)
        status = 3
    if run.disconnects:
        print(f"DISCONNECTED {run.disconnects} CONNECTIONS during the run", file=sys.stderr)
        status = 4 if status in (0, 1) else status
    if not users:
        status = status or 1
    return status
