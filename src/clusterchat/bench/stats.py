"""Numbers of a bench run: latency samples and percentiles, error counts, loss accounting, reports.

This module owns everything a bench measures *after* the wire: the hot path only appends
integers (nanoseconds) to an `array`, and the rest — percentiles, per-second progress,
the lost/duplicated bookkeeping, the table on stdout and the `--json` file — lives here,
free of sockets so it can be unit-tested directly.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TextIO

NS_PER_MS = 1_000_000

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[int], pct: float) -> int:
    """The nearest-rank percentile of already sorted values (0 when there are none)."""
    n = len(sorted_values)
    if n == 0:
        return 0
    rank = max(1, math.ceil(pct / 100.0 * n))
    return sorted_values[min(rank, n) - 1]


@dataclass(slots=True)
class LatencySummary:
    """Percentiles of one set of samples, in milliseconds."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    max: float = 0.0
    mean: float = 0.0

    @classmethod
    def of(cls, samples_ns: Iterable[int]) -> LatencySummary:
        values = sorted(samples_ns)
        if not values:
            return cls()
        p50, p90, p99, p999 = (percentile(values, p) / NS_PER_MS for p in PERCENTILES)
        return cls(len(values), p50, p90, p99, p999, values[-1] / NS_PER_MS, sum(values) / len(values) / NS_PER_MS)

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "p50": _r(self.p50), "p90": _r(self.p90), "p99": _r(self.p99),
                "p99.9": _r(self.p999), "max": _r(self.max), "mean": _r(self.mean)}

    def short(self) -> str:
        if not self.count:
            return "-"
        return f"p50 {self.p50:.2f}  p90 {self.p90:.2f}  p99 {self.p99:.2f}  max {self.max:.2f}"


def _r(x: float) -> float:
    return round(x, 3)


class LatencyLog:
    """All latency samples of a run in one `array('q')`, with marks for the measured window.

    The hot path calls `samples.append(ns)`; `tick()` returns the samples since the
    previous tick (the progress line's last second), and `start_window()`/`end_window()`
    remember where the measured window begins and ends in the array.
    """

    __slots__ = ("_last_tick", "samples", "window_end", "window_start")

    def __init__(self) -> None:
        self.samples: array[int] = array("q")
        self._last_tick = 0
        self.window_start: int | None = None
        self.window_end: int | None = None

    def tick(self) -> array[int]:
        end = len(self.samples)
        recent = self.samples[self._last_tick:end]
        self._last_tick = end
        return recent

    def start_window(self) -> None:
        self.window_start = len(self.samples)

    def end_window(self) -> None:
        self.window_end = len(self.samples)

    def window(self) -> array[int]:
        start = self.window_start if self.window_start is not None else 0
        end = self.window_end if self.window_end is not None else len(self.samples)
        return self.samples[start:end]

    @property
    def window_count(self) -> int:
        return len(self.window())


def phase_of(t: float, warmup: float, duration: float) -> str:
    """The phase of a run `t` seconds after its load started."""
    return "warmup" if t < warmup else "measure" if t < warmup + duration else "drain"


def series_point(t: float, phase: str, recent_ns: Iterable[int]) -> dict[str, Any]:
    """One second of a run for the `series` of the JSON and the plot: its latency percentiles."""
    s = LatencySummary.of(recent_ns)
    return {"t": round(t, 2), "phase": phase, "count": s.count, "p50_ms": _r(s.p50), "p90_ms": _r(s.p90),
            "p99_ms": _r(s.p99), "max_ms": _r(s.max)}


@dataclass(slots=True)
class LossReport:
    """Which confirmed sends never reached every recipient, and which reached one more than once.

    A message has `fanout` recipients (1 for a direct message, the group's size - 1 for a
    group message); `received`, `expected`, `lost` and `duplicated` count deliveries, one
    a recipient, and `sent`, `confirmed`, `failed` and `unanswered` count messages.
    """

    sent: int = 0  # send requests written
    confirmed: int = 0  # ok replies
    failed: int = 0  # error replies
    unanswered: int = 0  # no reply by the end (connection lost, or the drain ran out)
    expected: int = 0  # deliveries the confirmed messages owe: confirmed x fanout
    received: int = 0  # distinct deliveries of this run's messages
    lost: int = 0  # deliveries owed but never made
    duplicated: int = 0  # deliveries made again to the same recipient
    unconfirmed_received: int = 0  # deliveries of messages whose reply was an error or missing
    lost_examples: list[str] = field(default_factory=list)


class SenderLedger:
    """One sender's sends: counters 1..`next_counter`-1, which failed, which are unanswered,
    and to how many distinct recipients each was delivered (`delivered[counter]`).
    """

    __slots__ = ("delivered", "failed", "fanout", "index", "next_counter", "pending")

    def __init__(self, index: int, fanout: int = 1) -> None:
        self.index = index
        self.fanout = fanout  # recipients of each message
        self.next_counter = 1
        self.pending: dict[int, int] = {}  # counter -> send time (ns), until its reply
        self.failed: set[int] = set()
        self.delivered = array("I", (0,))  # by counter; [0] is unused

    def next(self, t_ns: int) -> int:
        """Book the next send (sent at `t_ns`); its counter."""
        c = self.next_counter
        self.next_counter = c + 1
        self.pending[c] = t_ns
        self.delivered.append(0)
        return c


class Arrival(IntEnum):
    NEW = 0
    LATE = 1  # new, but after a later message of the same sender: reordered
    DUPLICATE = 2


class ReceiverLedger:
    """What one recipient has seen of each sender: the highest counter and the gaps below it.

    Senders' messages reach a recipient in order (PROTOCOL.md 6), so the gaps stay empty
    unless something is lost, failed or reordered; this keeps a recipient's memory
    proportional to its senders, not to the messages it received.
    """

    __slots__ = ("gaps", "last")

    def __init__(self) -> None:
        self.last: dict[int, int] = {}  # sender -> highest counter seen
        self.gaps: dict[int, set[int]] = {}  # sender -> counters below `last` not seen

    def arrived(self, sender: int, counter: int) -> Arrival:
        last = self.last.get(sender, 0)
        if counter > last:
            if counter > last + 1:
                self.gaps.setdefault(sender, set()).update(range(last + 1, counter))
            self.last[sender] = counter
            return Arrival.NEW
        gaps = self.gaps.get(sender)
        if gaps and counter in gaps:
            gaps.discard(counter)
            return Arrival.LATE
        return Arrival.DUPLICATE


def account_losses(ledgers: Iterable[SenderLedger], duplicated: int, max_examples: int = 10) -> LossReport:
    """Compare what the senders had confirmed with what the recipients saw."""
    report = LossReport(duplicated=duplicated)
    for ledger in ledgers:
        sent = ledger.next_counter - 1
        delivered = ledger.delivered
        fanout = ledger.fanout
        report.sent += sent
        report.failed += len(ledger.failed)
        report.unanswered += len(ledger.pending)
        for counter in range(1, sent + 1):
            got = delivered[counter]
            if counter in ledger.failed or counter in ledger.pending:
                report.unconfirmed_received += got
                continue
            report.expected += fanout
            report.received += got
            if got < fanout:
                report.lost += fanout - got
                if len(report.lost_examples) < max_examples:
                    report.lost_examples.append(f"user#{ledger.index} message #{counter}"
                                                + (f" ({fanout - got} of {fanout} recipients)" if fanout > 1 else ""))
    report.confirmed = report.sent - report.failed - report.unanswered
    report.received += report.unconfirmed_received
    return report


class ErrorCounts(Counter[str]):
    """Error replies and error events by protocol code (plus bench-side kinds like `disconnect`)."""

    def text(self) -> str:
        return ", ".join(f"{code}={n}" for code, n in sorted(self.items())) if self else "none"


# ---------------------------------------------------------------------------- CPU


class CpuProbe:
    """CPU seconds used by given processes (servers), by this process and by the whole machine.

    `start()` and `stop()` bracket the measured window; `result()` gives utilisation in
    percent of one core, so a contended machine (other processes busy) shows up next to
    the throughput, and server CPU per message stays comparable across noisy runs.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        import psutil

        self._psutil = psutil
        self.procs = [psutil.Process(pid) for pid in pids]  # raises psutil.NoSuchProcess for a bad pid
        self.me = psutil.Process()
        self._start: tuple[list[float], float, float, float] | None = None
        self._end: tuple[list[float], float, float, float] | None = None

    def _sample(self) -> tuple[list[float], float, float, float]:
        import time

        server = []
        for p in self.procs:
            try:
                t = p.cpu_times()
                server.append(t.user + t.system)
            except self._psutil.Error:
                server.append(float("nan"))
        me = self.me.cpu_times()
        total = self._psutil.cpu_times()
        # Time spent running anything in this machine (guest time is already in user; steal is not ours).
        busy = sum(total) - total.idle - sum(getattr(total, f, 0.0) for f in ("iowait", "steal", "guest",
                                                                             "guest_nice"))
        return server, me.user + me.system, busy, time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> None:
        self._end = self._sample()

    def result(self) -> dict[str, Any] | None:
        if self._start is None or self._end is None:
            return None
        s0, m0, b0, t0 = self._start
        s1, m1, b1, t1 = self._end
        wall = max(t1 - t0, 1e-9)
        servers = [(b - a) / wall * 100 for a, b in zip(s0, s1, strict=True)]
        bench = (m1 - m0) / wall * 100
        machine = (b1 - b0) / wall * 100
        known = sum(x for x in servers if x == x) + bench
        return {"server_pct": [round(x, 1) for x in servers], "bench_pct": round(bench, 1),
                "machine_pct": round(machine, 1), "other_pct": round(max(0.0, machine - known), 1),
                "cores": self._psutil.cpu_count() or 1,
                "server_cpu_s": round(sum(b - a for a, b in zip(s0, s1, strict=True)), 3)}


def cpu_text(c: dict[str, Any] | None, per: str = "msg") -> str:
    """A `CpuProbe.result()` for the table; `server_us_per_{per}` is shown when present."""
    if c is None:
        return "-"
    parts = []
    key = f"server_us_per_{per}"
    if c["server_pct"]:
        parts.append("server " + "+".join(f"{x:.0f}%" for x in c["server_pct"])
                     + (f" ({c[key]:.0f} us/{per})" if key in c else ""))
    parts.append(f"bench {c['bench_pct']:.0f}%")
    parts.append(f"others {c['other_pct']:.0f}%" if c["server_pct"] else f"machine {c['machine_pct']:.0f}%")
    return ", ".join(parts) + f" (of {c['cores'] * 100}%)"


# ---------------------------------------------------------------------------- output


def table(rows: Sequence[tuple[str, Any]], title: str = "") -> str:
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title] if title else []
    lines.extend(f"  {k:<{width}}  {v}" for k, v in rows)
    return "\n".join(lines)


def progress(line: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    out.write(line + "\n")
    out.flush()


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"
