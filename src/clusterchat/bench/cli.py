"""Arguments of `clusterchat bench`."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="the load generator")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


async def run_bench(args: argparse.Namespace) -> int:
    raise SystemExit("bench: not yet")
