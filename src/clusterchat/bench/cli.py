"""Arguments of `clusterchat bench` and dispatch to its scenarios (direct, group, login, idle, baseline).

This module owns only the command line: `add_bench_parser` adds the `bench` subcommand
to the main parser, and `run_bench` turns the parsed arguments into a scenario's options
and runs it (under the uvloop the main CLI starts). The scenarios live in `direct.py`,
`group.py` (both on `traffic.py`), `login.py` and `idle.py`; `baseline.py` is the bare
router the scenarios can be measured against.
"""

from __future__ import annotations

import argparse
import sys

from clusterchat.bench.conn import parse_target


def _target(text: str) -> tuple[str, int]:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="the load generator", description="The load generator.")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    scenarios = p.add_subparsers(dest="scenario", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--users", type=int, required=True, help="number of users (connections)")
    common.add_argument("--transport", choices=["tcp", "ws"], default="tcp",
                        help="TCP JSON lines or WebSocket; the target port must match (default %(default)s)")
    common.add_argument("--password", default="benchpass", help="password of every bench user")
    common.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the numbers here")
    common.add_argument("--per-source", type=int, default=20000,
                        help="with more connections than this to a loopback target, use a new 127.0.0.x source "
                             "address every this many (default %(default)s)")
    common.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    common.add_argument("--ping-interval", type=_positive, default=30.0,
                        help="ping a connection silent this long, to stay within the node's idle timeout "
                             "(default %(default)s)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    # direct, group and login: timed runs against one or several nodes.
    targets = argparse.ArgumentParser(add_help=False)
    targets.add_argument("--target", dest="targets", action="append", type=_target, required=True,
                         metavar="HOST:PORT", help="a node; repeat for several (users are spread round-robin)")
    targets.add_argument("--server-pid", dest="server_pids", type=int, action="append", default=[], metavar="PID",
                         help="a node's pid, to report its CPU use in the window (repeatable)")
    targets.add_argument("--plot", dest="plot_path", default=None, metavar="FILE.png",
                         help="draw latency percentiles over time and a latency histogram here (needs matplotlib)")
    targets.add_argument("--duration", type=_positive, default=10.0,
                         help="seconds measured, after the warmup (default %(default)s)")
    targets.add_argument("--warmup", type=float, default=2.0,
                         help="seconds of load before measuring (default %(default)s)")
    targets.add_argument("--drain", type=float, default=5.0,
                         help="seconds to wait for what is outstanding at the end (default %(default)s)")
    targets.add_argument("--rate", type=_positive, default=None,
                         help="open loop: this many messages (login: logins) a second in total, each timed from "
                              "when it was due; without it, closed loop")

    # direct and group: users sending messages.
    traffic = argparse.ArgumentParser(add_help=False)
    traffic.add_argument("--window", type=int, default=1,
                         help="closed loop: sends each user keeps outstanding (default %(default)s)")
    traffic.add_argument("--arrival", choices=["uniform", "poisson"], default="uniform",
                         help="open loop: evenly paced or Poisson arrivals (default %(default)s)")
    traffic.add_argument("--size", type=int, default=0, help="pad message texts to about this many characters")
    traffic.add_argument("--ack-interval", type=_positive, default=0.05,
                         help="each receiver acks its highest seq this long after the first "
                              "unacknowledged delivery (default %(default)s s)")
    traffic.add_argument("--ack-every", type=int, default=100,
                         help="... or at once when this many messages are unacknowledged (default %(default)s)")
    traffic.add_argument("--prefix", default="bench",
                         help="user names are PREFIX0, PREFIX1, ... (default %(default)s)")

    scenarios.add_parser(
        "direct", parents=[common, targets, traffic], help="friend pairs sending direct messages",
        description="N users in N/2 friend pairs send each other direct messages; reports msgs/s, "
                    "send-to-receive latency, errors, lost and duplicated messages. Exits 3 on any loss, "
                    "4 when a connection dropped.")

    g = scenarios.add_parser(
        "group", parents=[common, targets, traffic], help="fan-out: groups whose members all send to the group",
        description="N users in N/SIZE groups; every member sends group messages, which reach every other "
                    "member. Reports messages and deliveries a second, send-to-receive latency per delivery, "
                    "errors, lost and duplicated deliveries. --rate counts messages, not deliveries. Exits 3 on "
                    "any loss, 4 when a connection dropped.")
    g.add_argument("--group-size", type=int, default=10,
                   help="members of each group; --users must be a multiple of it (default %(default)s)")

    lg = scenarios.add_parser(
        "login", parents=[common, targets], help="logins a second and login latency",
        description="Registers N users, then --concurrency connections log in over and over (logging out, or "
                    "with --reconnect closing the connection, after each login) for --duration seconds. Reports "
                    "logins a second, login latency and errors by code; exits 1 on any error. Start the node "
                    "with --rate-limit 0.")
    lg.add_argument("--concurrency", type=int, default=10,
                    help="connections logging in at once; at most --users (default %(default)s)")
    lg.add_argument("--reconnect", action="store_true",
                    help="a new connection for every login, instead of logout and login on the same one")
    lg.add_argument("--timeout", type=_positive, default=30.0,
                    help="seconds to wait for a reply before counting a timeout (default %(default)s)")
    lg.add_argument("--prefix", default="login", help="user names are PREFIX0, PREFIX1, ... (default %(default)s)")

    i = scenarios.add_parser(
        "idle", parents=[common], help="many idle logged-in connections: server memory per connection",
        description="Registers and logs in N users, keeps them idle, and reports the server's RSS per connection.")
    i.add_argument("--target", type=_target, required=True, metavar="HOST:PORT", help="the node")
    i.add_argument("--server-pid", type=int, default=None,
                   help="the node's pid (default: whoever listens on the target port, when visible)")
    i.add_argument("--prefix", default="idle", help="user names are PREFIX0, PREFIX1, ... (default %(default)s)")
    i.add_argument("--settle", type=float, default=5.0, help="seconds to wait before measuring (default %(default)s)")
    i.add_argument("--hold", type=float, default=0.0,
                   help="keep the connections idle this many seconds more (default %(default)s)")

    b = scenarios.add_parser(
        "baseline", help="a bare router to bench against: the machine's ceiling",
        description="A router in the node's process model (asyncio + uvloop, a Protocol per connection, "
                    "JSON lines) that forwards direct messages by `to`, with no auth and no storage. "
                    "Run `bench direct` against it for the ceiling this machine allows. TCP only.")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    b.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default %(default)s)")
    b.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


async def run_bench(args: argparse.Namespace) -> int:
    if args.scenario in ("direct", "group"):
        traffic = dict(
            targets=args.targets, users=args.users, duration=args.duration, warmup=max(0.0, args.warmup),
            rate=args.rate, window=args.window, arrival=args.arrival, transport=args.transport, prefix=args.prefix,
            password=args.password, size=args.size, drain=args.drain, per_source=args.per_source,
            json_path=args.json_path, plot_path=args.plot_path, quiet=args.quiet, server_pids=args.server_pids,
            ping_interval=args.ping_interval, ack_interval=args.ack_interval, ack_every=args.ack_every,
        )
        if args.scenario == "direct":
            from clusterchat.bench.direct import DirectOptions, run_direct

            return await run_direct(DirectOptions(**traffic))
        from clusterchat.bench.group import GroupOptions, run_group

        return await run_group(GroupOptions(**traffic, group_size=args.group_size))
    if args.scenario == "login":
        from clusterchat.bench.login import LoginOptions, run_login

        return await run_login(LoginOptions(
            targets=args.targets, users=args.users, duration=args.duration, warmup=max(0.0, args.warmup),
            concurrency=args.concurrency, rate=args.rate, reconnect=args.reconnect, transport=args.transport,
            prefix=args.prefix, password=args.password, timeout=args.timeout, drain=args.drain,
            per_source=args.per_source, json_path=args.json_path, plot_path=args.plot_path, quiet=args.quiet,
            server_pids=args.server_pids, ping_interval=args.ping_interval,
        ))
    if args.scenario == "idle":
        from clusterchat.bench.idle import IdleOptions, run_idle

        return await run_idle(IdleOptions(
            target=args.target, users=args.users, server_pid=args.server_pid, prefix=args.prefix,
            password=args.password, transport=args.transport, settle=args.settle, hold=args.hold,
            ping_interval=args.ping_interval, per_source=args.per_source, json_path=args.json_path,
            quiet=args.quiet,
        ))
    if args.scenario == "baseline":
        from clusterchat.bench.baseline import run_baseline

        return await run_baseline(args.host, args.port)
    print(f"bench: unknown scenario {args.scenario}", file=sys.stderr)
    return 2
