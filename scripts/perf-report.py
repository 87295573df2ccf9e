"""Measure a node against the bare-router baseline in one run; print medians and ratios.

    python scripts/perf-report.py --db sqlite --db postgresql=URL [--users 1000] [--runs 3] [--window 1]
        [--group-size 100 ...] [--login] [--idle 15000] [--plot FILE.png]

For each target (the baseline first, then a node per --db) it runs `clusterchat bench
direct` closed loop `--runs` times, then open loop at half the median closed-loop rate,
and prints the median msgs/s, p50 and p99, each node's ratio to the baseline, and the
server's CPU per message. Every run must lose nothing (bench exits non-zero otherwise).

On the first node (the first --db) it can also run, each `--runs` times: `bench group` for
each --group-size (deliveries a second), `bench login` (logins a second), and once `bench
idle` with --idle connections (RSS per connection). --plot draws the first closed-loop
direct run of that node.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY = re.compile(r"listening on tcp://([^:]+):(\d+)")


def start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = READY.search(line)
        if m:
            return proc, f"{m.group(1)}:{m.group(2)}"
    raise RuntimeError(f"{cmd[:3]} did not start")


def bench(target: str, pid: int, users: int, duration: float, extra: list[str], out: Path,
          scenario: str = "direct") -> dict[str, Any]:
    cmd = ["clusterchat", "bench", scenario, "--target", target, "--users", str(users), "--quiet", "--json", str(out),
           "--server-pid", str(pid), *(["--duration", str(duration)] if scenario != "idle" else []), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def pick(data: dict[str, Any], *keys: str) -> float:
    for key in keys:
        node: Any = data
        try:
            for part in key.split("."):
                node = node[part]
            return float(node)
        except (KeyError, TypeError):
            continue
    raise KeyError(keys)


def summarize(closed: list[dict[str, Any]], half: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of the closed-loop runs and of the half-rate runs of one target, and the total lost."""
    rate = statistics.median(pick(d, "msgs_per_s") for d in closed)
    return {
        "closed_msgs_s": rate,
        "closed_p50": statistics.median(pick(d, "latency_ms.p50") for d in closed),
        "closed_p99": statistics.median(pick(d, "latency_ms.p99") for d in closed),
        "half_rate": rate / 2,
        "half_p50": statistics.median(pick(d, "latency_ms.p50") for d in half),
        "half_p99": statistics.median(pick(d, "latency_ms.p99") for d in half),
        "us_per_msg": statistics.median(pick(d, "cpu.server_us_per_msg") for d in closed),
        "lost": sum(pick(d, "lost") for d in closed + half),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", action="append", default=[], help="sqlite, or NAME=URL (e.g. postgresql=postgresql://…)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--window", type=int, default=1, help="closed loop: sends each user keeps outstanding")
    p.add_argument("--group-size", type=int, action="append", default=[], help="bench group with this size")
    p.add_argument("--login", action="store_true", help="bench login (logins a second)")
    p.add_argument("--idle", type=int, default=0, help="bench idle with this many connections")
    p.add_argument("--plot", default=None, help="PNG of the first closed-loop direct run on the first node")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clusterchat-perf-"))
    targets: list[tuple[str, list[str]]] = [("baseline", ["clusterchat", "bench", "baseline", "--port", "0"])]
    for spec in args.db or ["sqlite"]:
        name, _, url = spec.partition("=")
        url = url or f"sqlite:///{work / (name + '.db')}"
        targets.append((name, ["clusterchat", "serve", "--port", "0", "--ws-port", "0", "--db", url,
                               "--rate-limit", "0", "--argon2-memory", "1024", "--log-level", "WARNING"]))
    results: dict[str, dict[str, float]] = {}
    extras: dict[str, list[str]] = {}
    for name, cmd in targets:
        proc, target = start(cmd, work)
        try:
            first_node = name == targets[1][0]
            plot = ["--plot", args.plot] if args.plot and first_node else []
            window = ["--window", str(args.window)]
            closed = [bench(target, proc.pid, args.users, args.duration, window + (plot if i == 0 else []),
                            work / f"{name}-c{i}.json") for i in range(args.runs)]
            rate = statistics.median(pick(d, "msgs_per_s") for d in closed)
            half = [bench(target, proc.pid, args.users, args.duration, ["--rate", str(int(rate / 2))],
                          work / f"{name}-o{i}.json") for i in range(args.runs)]
            if first_node:
                extras[name] = node_extras(args, target, proc.pid, work / name)
        finally:
            proc.terminate()
            proc.wait(30)
        results[name] = summarize(closed, half)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        time.sleep(1)
    base = results["baseline"]["closed_msgs_s"]
    print(f"{'target':<12} {'msgs/s':>9} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'half rate':>9} {'p50 ms':>8} {'p99 ms':>8} | {'us/msg':>6} {'lost':>4}")
    for name, r in results.items():
        print(f"{name:<12} {r['closed_msgs_s']:>9,.0f} {r['closed_msgs_s'] / base:>6.2f} {r['closed_p50']:>8.1f} "
              f"{r['closed_p99']:>8.1f} | {r['half_rate']:>9,.0f} {r['half_p50']:>8.1f} {r['half_p99']:>8.1f} | "
              f"{r['us_per_msg']:>6.0f} {r['lost']:>4.0f}")
    print(f"(medians of {args.runs} runs of `clusterchat bench direct --users {args.users} --duration "
          f"{args.duration:g}`, closed loop window {args.window}, then open loop at half that rate; JSON in {work})")
    for name, lines in extras.items():
        for line in lines:
            print(f"{name}: {line}")
    return 0


def node_extras(args: argparse.Namespace, target: str, pid: int, out: Path) -> list[str]:
    """The group, login and idle figures of one node, as lines of text."""
    lines = []
    for size in args.group_size:
        users = max(size * 2, (args.users // size) * size)
        runs = [bench(target, pid, users, args.duration, ["--group-size", str(size), "--prefix", f"g{size}-"],
                      out.with_name(f"{out.name}-g{size}-{i}.json"), "group") for i in range(args.runs)]
        lines.append(
            f"group of {size} ({users} users): {statistics.median(pick(d, 'deliveries_per_s') for d in runs):,.0f} "
            f"deliveries/s, {statistics.median(pick(d, 'msgs_per_s') for d in runs):,.0f} msgs/s, p50 "
            f"{statistics.median(pick(d, 'latency_ms.p50') for d in runs):.1f} ms, p99 "
            f"{statistics.median(pick(d, 'latency_ms.p99') for d in runs):.1f} ms, lost "
            f"{sum(pick(d, 'lost') for d in runs):.0f}")
    if args.login:
        runs = [bench(target, pid, 200, args.duration, ["--concurrency", "20"],
                      out.with_name(f"{out.name}-login-{i}.json"), "login") for i in range(args.runs)]
        lines.append(
            f"login (200 users, 20 at once): {statistics.median(pick(d, 'logins_per_s') for d in runs):,.1f} "
            f"logins/s, p50 {statistics.median(pick(d, 'latency_ms.p50') for d in runs):.1f} ms, p99 "
            f"{statistics.median(pick(d, 'latency_ms.p99') for d in runs):.1f} ms")
    if args.idle:
        d = bench(target, pid, args.idle, 0, [], out.with_name(f"{out.name}-idle.json"), "idle")
        lines.append(f"idle ({args.idle} connections, {d['logged_in']} logged in): "
                     f"{d['kib_per_session']:.1f} KiB of node RSS per logged-in connection "
                     f"({d['kib_per_connection']:.1f} KiB per connection before login)")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
