"""The frame every timed bench scenario runs in: checks before, the clock during, the outputs after.

This module owns what `traffic.py` (direct, group) and `login.py` share around their
load: the checks that must fail before any setup (`--plot` without matplotlib, too few
open files, a bad `--server-pid`), the warmup and the measured window (latency logs and
the CPU probe bracketed together), the progress line and `series` point every second,
and writing `--json` and `--plot` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from clusterchat.bench import plot
from clusterchat.bench.conn import raise_nofile_limit
from clusterchat.bench.stats import CpuProbe, LatencyLog, phase_of, progress, series_point, write_json


def preflight(who: str, connections: int, plot_path: str | None, server_pids: list[int]) -> CpuProbe | None:
    """Everything that can fail before setup; the CPU probe, or None after saying on stderr what is wrong."""
    if plot_path and (why := plot.missing()):
        print(f"{who}: {why}", file=sys.stderr)
        return None
    limit = raise_nofile_limit()
    if connections + 64 > limit:
        print(f"{who}: {connections} connections need more open files than the limit of {limit}", file=sys.stderr)
        return None
    try:
        return CpuProbe(server_pids)
    except Exception as exc:
        print(f"{who}: cannot watch the server pids {server_pids}: {exc}", file=sys.stderr)
        return None


async def measured_window(warmup: float, duration: float, logs: Sequence[LatencyLog], cpu: CpuProbe,
                          t_start: float) -> tuple[float, float]:
    """Sleep through the warmup and the window, marking the window in `logs` and `cpu`.

    Returns the window's start and end in seconds since `t_start` (when the load started).
    """
    await asyncio.sleep(warmup)
    start = time.perf_counter()
    for log in logs:
        log.start_window()
    cpu.start()
    await asyncio.sleep(duration)
    end = time.perf_counter()
    for log in logs:
        log.end_window()
    cpu.stop()
    return start - t_start, end - t_start


async def every_second(log: LatencyLog, t_start: float, warmup: float, duration: float, stop: asyncio.Event,
                       series: list[dict[str, Any]], quiet: bool,
                       complete: Callable[[dict[str, Any], float], str]) -> None:
    """Until `stop`: every second a `series` point of `log`'s new samples and a progress line.

    A point's phase is that of its second's middle. `complete(point, seconds)` adds the
    scenario's rates to the point and returns the rest of the progress line.
    """
    last = time.perf_counter()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        now = time.perf_counter()
        recent = log.tick()
        if stop.is_set() and not recent:
            break  # the stub of a second after the drain: nothing to show
        point = series_point(now - t_start, phase_of((last + now) / 2 - t_start, warmup, duration), recent)
        line = complete(point, max(now - last, 1e-9))
        last = now
        series.append(point)
        if not quiet:
            progress(f"[{point['t']:6.1f}s {point['phase']:7}] {line}")


def write_outputs(who: str, result: dict[str, Any], json_path: str | None, plot_path: str | None,
                  title: str, samples_ns: Sequence[int], rate_key: str, rate_label: str) -> bool:
    """Write `--json` and `--plot` (from `result`'s `series` and `window_s`); False if the plot failed."""
    if json_path:
        write_json(json_path, result)
    if plot_path:
        return plot.save(plot_path, title, result["series"], samples_ns, result["window_s"], rate_key, rate_label,
                         who)
    return True
