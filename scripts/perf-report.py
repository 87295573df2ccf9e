"""Measure a node against the bare-router baseline in one run; print medians and ratios.

    python scripts/perf-report.py --db sqlite --db postgresql=URL [--users 1000] [--runs 3]

For each target (the baseline first, then a node per --db) it runs `clusterchat bench
direct` closed loop `--runs` times, then open loop at half the median closed-loop rate,
and prints the median msgs/s, p50 and p99, each node's ratio to the baseline, and the
server's CPU per message. Every run must lose nothing (bench exits non-zero otherwise).
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

READY = re.compile(r"listening on tcp://([^:]+):(\d+)")


def start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = READY.search(line)
        if m:
            return proc, f"{m.group(1)}:{m.group(2)}"
    raise RuntimeError(f"{cmd[:3]} did not start")


def bench(target: str, pid: int, users: int, duration: float, extra: list[str], out: Path) -> dict[str, float]:
    cmd = ["clusterchat", "bench", "direct", "--target", target, "--users", str(users), "--duration", str(duration),
           "--server-pid", str(pid), "--quiet", "--json", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    return data


def pick(data: dict, *keys: str) -> float:
    for key in keys:
        node = data
        try:
            for part in key.split("."):
                node = node[part]
            return float(node)
        except (KeyError, TypeError):
            continue
    raise KeyError(keys)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", action="append", default=[], help="sqlite, or NAME=URL (e.g. postgresql=postgresql://…)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clusterchat-perf-"))
    targets: list[tuple[str, list[str]]] = [("baseline", ["clusterchat", "bench", "baseline", "--port", "0"])]
    for spec in args.db or ["sqlite"]:
        name, _, url = spec.partition("=")
        url = url or f"sqlite:///{work / (name + '.db')}"
        targets.append((name, ["clusterchat", "serve", "--port", "0", "--ws-port", "0", "--db", url,
                               "--rate-limit", "0", "--argon2-memory", "1024", "--log-level", "WARNING"]))
    results: dict[str, dict[str, float]] = {}
    for name, cmd in targets:
        proc, target = start(cmd, work)
        try:
            closed = [bench(target, proc.pid, args.users, args.duration, [], work / f"{name}-c{i}.json")
                      for i in range(args.runs)]
            rate = statistics.median(pick(d, "msgs_per_s", "throughput.msgs_per_s") for d in closed)
            half = [bench(target, proc.pid, args.users, args.duration, ["--rate", str(int(rate / 2))],
                          work / f"{name}-o{i}.json") for i in range(args.runs)]
        finally:
            proc.terminate()
            proc.wait(30)
        results[name] = {
            "closed_msgs_s": rate,
            "closed_p50": statistics.median(pick(d, "latency_ms.p50") for d in closed),
            "closed_p99": statistics.median(pick(d, "latency_ms.p99") for d in closed),
            "half_rate": rate / 2,
            "half_p50": statistics.median(pick(d, "latency_ms.p50") for d in half),
            "half_p99": statistics.median(pick(d, "latency_ms.p99") for d in half),
            "us_per_msg": statistics.median(pick(d, "cpu.server_us_per_msg") for d in closed),
            "lost": sum(pick(d, "lost") for d in closed + half),
        }
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
          f"{args.duration:g}`, closed loop window 1, then open loop at half that rate; JSON in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
