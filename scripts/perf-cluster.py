"""Cluster figures in one run: one node, two nodes over Redis, and the same through nginx.

    python scripts/perf-cluster.py [--users 1000] [--runs 3] [--duration 10]

Starts `clusterchat cluster --nodes 2` (Redis, a durable throw-away PostgreSQL, two nodes,
nginx), a standalone node on the same database, and the bare-router baseline. For each
target it runs `clusterchat bench direct` closed loop `--runs` times, then open loop at
half the median closed-loop rate, and prints medians, ratios to the single node and to
the baseline, the nodes' CPU per message and Redis's CPU share. With the two nodes as
targets every friend pair is split across them (user i goes to target i mod 2, pairs are
users 2k and 2k+1), so every message crosses Redis. Any loss makes the bench exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

_spec = importlib.util.spec_from_file_location("perf_report", Path(__file__).with_name("perf-report.py"))
assert _spec is not None and _spec.loader is not None
perf_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_report)
bench, pick, start = perf_report.bench, perf_report.pick, perf_report.start

NODE_FLAGS = ["--rate-limit", "0", "--argon2-memory", "1024", "--log-level", "WARNING"]


def start_cluster(work: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = ["clusterchat", "cluster", "--nodes", "2", "--port", "0", "--ws-port", "0",
           "--run-dir", str(work / "cluster"), "--", *NODE_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    info: dict[str, Any] = {"nodes": [], "pids": []}
    for line in proc.stdout:
        if m := re.match(r"\s+node\s+\S+ tcp://(\S+) .* pid (\d+)", line):
            info["nodes"].append(m.group(1))
            info["pids"].append(int(m.group(2)))
        elif m := re.match(r"\s+redis\s+redis://[^:]+:(\d+)", line):
            info["redis_port"] = int(m.group(1))
        elif m := re.match(r"\s+database\s+(\S+)", line):
            info["db"] = m.group(1)
        elif m := re.match(r"\s+tcp\s+(\S+)", line):
            info["nginx"] = m.group(1)
        elif line.startswith("clusterchat cluster ready"):
            return proc, info
    raise RuntimeError("clusterchat cluster did not start")


def redis_pid(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on {port}")


def measure(name: str, targets: list[str], pids: list[int], redis: psutil.Process | None, args: argparse.Namespace,
            work: Path) -> dict[str, float]:
    extra_targets = [flag for t in targets[1:] for flag in ("--target", t)]
    extra_pids = [flag for p in pids[1:] for flag in ("--server-pid", str(p))]
    prefix = ["--prefix", f"{name}-"]

    def run(extra: list[str], out: Path) -> tuple[dict[str, Any], float]:
        before = sum(redis.cpu_times()[:2]) if redis else 0.0
        started = time.monotonic()
        data = bench(targets[0], pids[0], args.users, args.duration, [*extra_targets, *extra_pids, *prefix, *extra],
                     out)
        share = (sum(redis.cpu_times()[:2]) - before) / (time.monotonic() - started) if redis else 0.0
        return data, share

    closed = [run([], work / f"{name}-c{i}.json") for i in range(args.runs)]
    rate = statistics.median(pick(d, "msgs_per_s") for d, _ in closed)
    half = [run(["--rate", str(int(rate / 2))], work / f"{name}-o{i}.json") for i in range(args.runs)]
    result = perf_report.summarize([d for d, _ in closed], [d for d, _ in half])
    result["redis_cpu"] = statistics.median(s for _, s in closed)
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clusterchat-perf-cluster-"))
    cluster, info = start_cluster(work)
    procs: list[subprocess.Popen[str]] = []
    try:
        baseline, base_target = start(["clusterchat", "bench", "baseline", "--port", "0"], work)
        procs.append(baseline)
        single, single_target = start(["clusterchat", "serve", "--port", "0", "--ws-port", "0", "--db", info["db"],
                                       "--name", "single", *NODE_FLAGS], work)
        procs.append(single)
        redis = psutil.Process(redis_pid(info["redis_port"]))
        results = {
            "baseline": measure("baseline", [base_target], [baseline.pid], None, args, work),
            "one node": measure("single", [single_target], [single.pid], None, args, work),
            "2 nodes, split": measure("split", info["nodes"], info["pids"], redis, args, work),
            "2 nodes, nginx": measure("nginx", [info["nginx"]], info["pids"], redis, args, work),
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        cluster.send_signal(signal.SIGINT)
        cluster.wait(60)
    base, one = results["baseline"]["closed_msgs_s"], results["one node"]["closed_msgs_s"]
    print(f"{'target':<16} {'msgs/s':>9} {'/1 node':>7} {'/base':>6} {'p50 ms':>7} {'p99 ms':>7} | "
          f"{'half rate':>9} {'p50 ms':>7} {'p99 ms':>7} | {'us/msg':>6} {'redis':>6} {'lost':>4}")
    for name, r in results.items():
        print(f"{name:<16} {r['closed_msgs_s']:>9,.0f} {r['closed_msgs_s'] / one:>7.2f} "
              f"{r['closed_msgs_s'] / base:>6.2f} {r['closed_p50']:>7.1f} {r['closed_p99']:>7.1f} | "
              f"{r['half_rate']:>9,.0f} {r['half_p50']:>7.1f} "
              f"{r['half_p99']:>7.1f} | {r['us_per_msg']:>6.0f} {r['redis_cpu'] * 100:>5.0f}% {r['lost']:>4.0f}")
    print(f"(medians of {args.runs} runs of `clusterchat bench direct --users {args.users} --duration "
          f"{args.duration:g}`, closed loop window 1, then open loop at half that rate; us/msg is the nodes' CPU "
          f"per message, redis is Redis's CPU share of one core in the closed-loop runs; JSON in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
