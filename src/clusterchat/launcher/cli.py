"""The `clusterchat cluster` and `clusterchat nginx-config` subcommands: their flags and entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def add_launcher_parsers(sub: Any) -> None:  # argparse's _SubParsersAction is private
    cluster_p = sub.add_parser(
        "cluster", help="a whole cluster on this machine: Redis, a database, N nodes, nginx in front",
        description="Start Redis (unless --redis), a shared database (unless --db: a throw-away PostgreSQL, "
                    "or MariaDB), N nodes and nginx in front (TCP least_conn on --port, WebSocket on --ws-port). "
                    "Ctrl-C or SIGTERM stops all of it. Arguments after -- go to every node "
                    "(e.g. -- --rate-limit 0).")
    cluster_p.add_argument("--nodes", type=int, default=2, help="number of nodes (default %(default)s)")
    cluster_p.add_argument("--host", default="127.0.0.1",
                           help="address nginx and the nodes listen on (default %(default)s)")
    cluster_p.add_argument("--port", type=int, default=7000,
                           help="nginx's TCP port; 0 picks a free one (default %(default)s)")
    cluster_p.add_argument("--ws-port", type=int, default=7001,
                           help="nginx's WebSocket port (path /ws); 0 picks one (default %(default)s)")
    cluster_p.add_argument("--db", dest="db_url", default=None,
                           help="shared database URL (postgresql://… or mysql://…); default: start a throw-away "
                                "PostgreSQL (or MariaDB) in the run folder")
    cluster_p.add_argument("--redis", dest="redis_url", default=None,
                           help="Redis URL; default: start a Redis in the run folder")
    cluster_p.add_argument("--run-dir", type=Path, default=None,
                           help="folder for logs, nginx's files and the started servers' data, kept on exit "
                                "(default: a temporary folder, removed on exit)")
    cluster_p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="the launcher's own log level")
    cluster_p.add_argument("node_args", nargs="*", metavar="-- NODE_ARGS",
                           help="flags passed to every `clusterchat serve`")

    nginx_p = sub.add_parser(
        "nginx-config", help="print an nginx.conf putting nginx in front of running nodes",
        description="Print the nginx configuration `clusterchat cluster` uses, for nodes started by hand: TCP "
                    "least_conn on --port, WebSocket (/ws) on --ws-port.")
    nginx_p.add_argument("--node", dest="nodes", action="append", required=True, metavar="HOST:PORT:WSPORT",
                         help="a node's host, TCP port and WebSocket port; repeat for every node")
    nginx_p.add_argument("--host", default="0.0.0.0", help="address nginx listens on (default %(default)s)")
    nginx_p.add_argument("--port", type=int, default=7000, help="nginx's TCP port (default %(default)s)")
    nginx_p.add_argument("--ws-port", type=int, default=7001, help="nginx's WebSocket port (default %(default)s)")
    nginx_p.add_argument("--stream-module", default="auto", metavar="auto|none|PATH",
                         help="load_module for nginx's dynamic stream module: auto (ask this machine's nginx), "
                              "none (built in, or loaded elsewhere) or the .so's path (default %(default)s)")
    nginx_p.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help=argparse.SUPPRESS)


def run_launcher_command(args: argparse.Namespace) -> int:
    if args.command == "cluster":
        from clusterchat.launcher.cluster import ClusterOptions, run_cluster

        node_args = list(args.node_args)
        if node_args[:1] == ["--"]:
            node_args = node_args[1:]
        return run_cluster(ClusterOptions(
            nodes=args.nodes, host=args.host, port=args.port, ws_port=args.ws_port, db_url=args.db_url,
            redis_url=args.redis_url, run_dir=args.run_dir, node_args=node_args))
    return _print_nginx_config(args)


def _print_nginx_config(args: argparse.Namespace) -> int:
    from clusterchat.launcher.nginx import (
        WORKER_CONNECTIONS,
        NodeAddress,
        find_nginx,
        render_config,
        stream_module_path,
    )
    from clusterchat.launcher.processes import BackendUnavailable

    try:
        nodes = [NodeAddress.parse(text) for text in args.nodes]
    except ValueError as exc:
        print(f"clusterchat nginx-config: {exc}", file=sys.stderr)
        return 2
    stream_module: Path | None = None
    load_hint = False
    if args.stream_module == "auto":
        try:
            stream_module = stream_module_path(find_nginx())
        except BackendUnavailable:  # no usable nginx here: the operator's machine decides
            load_hint = True
    elif args.stream_module != "none":
        stream_module = Path(args.stream_module)
    print(render_config(nodes, host=args.host, port=args.port, ws_port=args.ws_port, stream_module=stream_module,
                        load_hint=load_hint, worker_rlimit_nofile=2 * WORKER_CONNECTIONS + 1024), end="")
    return 0
