"""The `clusterchat` command: serve, db upgrade, bench, client, cluster, nginx-config (and later gate)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from clusterchat.config import NodeConfig


def _node_args(p: argparse.ArgumentParser) -> None:
    d = NodeConfig()
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port; 0 picks a free one (default %(default)s)")
    p.add_argument("--ws-port", type=int, default=d.ws_port, help="WebSocket port; 0 picks one (default %(default)s)")
    p.add_argument("--db", dest="db_url", default=None,
                   help="database URL (sqlite:///path.db, mysql://…, postgresql://…); "
                        "default: clusterchat.db in the working directory")
    p.add_argument("--redis", dest="redis_url", default=None, help="Redis URL; without it the node is standalone")
    p.add_argument("--name", default=None, help="node name (default: HOSTNAME-PORT)")
    p.add_argument("--duplicate-login", choices=["kick", "reject"], default=d.duplicate_login,
                   help="a second login of a user kicks the first (default) or is rejected")
    p.add_argument("--max-frame", type=int, default=d.max_frame, help="largest frame in bytes (default %(default)s)")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit,
                   help="requests a second per connection, bursts of twice that; 0 = off (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="close connections silent this many seconds; 0 = never (default %(default)s)")
    p.add_argument("--max-buffer", type=int, default=d.max_buffer,
                   help="bytes queued to a client before it is dropped (default %(default)s)")
    p.add_argument("--token-ttl", type=float, default=d.token_ttl, help="token lifetime in seconds (default 24 h)")
    p.add_argument("--advertise-host", default=None, help="host name clients are told to reach this node by")
    p.add_argument("--argon2-memory", dest="argon2_memory_kib", type=int, default=d.argon2_memory_kib,
                   help="argon2id memory cost in KiB (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _config(args: argparse.Namespace) -> NodeConfig:
    config = NodeConfig()
    for key in ("host", "port", "ws_port", "redis_url", "name", "duplicate_login", "max_frame", "rate_limit",
                "idle_timeout", "max_buffer", "token_ttl", "advertise_host", "argon2_memory_kib"):
        setattr(config, key, getattr(args, key))
    if args.db_url:
        config.db_url = args.db_url
    return config


def _logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(coro) -> int:  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[no-any-return]
    return uvloop.run(coro)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clusterchat", description="A horizontally scalable chat server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="run one chat node")
    _node_args(serve_p)

    db_p = sub.add_parser("db", help="database administration")
    db_sub = db_p.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="create or upgrade the schema to the newest version")
    up.add_argument("--db", dest="db_url", required=True, help="database URL")
    up.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    from clusterchat.bench.cli import add_bench_parser

    add_bench_parser(sub)

    from clusterchat.launcher.cli import add_launcher_parsers

    add_launcher_parsers(sub)

    client_p = sub.add_parser("client", help="the interactive terminal client")
    client_p.add_argument("--host", default="127.0.0.1", help="the node's address (default %(default)s)")
    client_p.add_argument("--port", type=int, default=7000, help="the node's TCP port (default %(default)s)")
    client_p.add_argument("--ws", action="store_true", help="connect over WebSocket: --port is then the ws port")
    client_p.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    args = parser.parse_args(argv)
    _logging(args.log_level)
    if args.command == "serve":
        from clusterchat.node import serve

        return _run(serve(_config(args)))
    if args.command == "db":
        return _run(_upgrade(args.db_url))
    if args.command == "bench":
        from clusterchat.bench.cli import run_bench

        return _run(run_bench(args))
    if args.command in ("cluster", "nginx-config"):
        from clusterchat.launcher.cli import run_launcher_command

        return run_launcher_command(args)
    if args.command == "client":
        from clusterchat.terminal.app import run_terminal

        try:
            return _run(run_terminal(args.host, args.port, websocket=args.ws))
        except KeyboardInterrupt:
            return 130
    parser.error(f"unknown command {args.command}")
    return 2


async def _upgrade(url: str) -> int:
    from clusterchat.storage.engine import Database, redact

    db = Database(url)
    try:
        await db.upgrade()
    except Exception as exc:
        print(f"clusterchat: cannot upgrade {redact(url)}: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await db.close()
    print(f"database {redact(url)} is at the newest schema")
    return 0
