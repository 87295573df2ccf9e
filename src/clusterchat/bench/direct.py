"""`clusterchat bench direct`: friend pairs sending direct messages to each other.

This module owns what makes the direct-message benchmark: N users as N/2 friend pairs
(users 0 and 1, 2 and 3, ...), befriended unless an earlier run already did, each
sending to its partner. Everything else — setup, the loops, receiving, the report — is
`traffic.py`'s.
"""

from __future__ import annotations

import sys

from clusterchat.bench.conn import RequestFailed
from clusterchat.bench.traffic import Scenario, TrafficOptions, TrafficRun, TrafficUser, each, run_traffic

DirectOptions = TrafficOptions  # direct needs nothing more than what every messaging bench takes


async def _befriend(a: TrafficUser, b: TrafficUser) -> None:
    if b.user_id in a.friends:
        return
    try:
        await a.request("friend_request", user_id=b.user_id, note="bench")
    except RequestFailed as exc:
        if exc.code != "already_friends":
            raise
    try:
        await b.request("friend_accept", user_id=a.user_id)
    except RequestFailed as exc:
        if exc.code != "already_friends":
            raise


async def _pair(run: TrafficRun, users: list[TrafficUser]) -> str:
    pairs = [(users[i], users[i + 1]) for i in range(0, len(users), 2)]
    await each([_befriend(a, b) for a, b in pairs], "befriending")
    for a, b in pairs:
        a.prepare(f'"to":{b.user_id}')
        b.prepare(f'"to":{a.user_id}')
    return f"{len(pairs)} friend pairs"


async def run_direct(o: DirectOptions) -> int:
    if o.users < 2 or o.users % 2:
        print("bench direct: --users must be an even number of at least 2", file=sys.stderr)
        return 2
    return await run_traffic(o, Scenario("direct", "send", 1, _pair))


__all__ = ["DirectOptions", "run_direct"]
