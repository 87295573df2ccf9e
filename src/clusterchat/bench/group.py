"""`clusterchat bench group`: fan-out, every member of a group sending to all the others.

This module owns what makes the group benchmark: N users split into N/SIZE groups of
`--group-size` members (users 0..SIZE-1 the first group, and so on), each group named
`PREFIX-gSIZE-K` and created by its first member unless an earlier run left it there,
every member sending `group_send` to its group. A message owes SIZE-1 deliveries, one to
every member but its sender; latency, loss and duplicates are counted per delivery by
`traffic.py`, which runs everything else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from clusterchat.bench.traffic import Scenario, TrafficOptions, TrafficRun, TrafficUser, each, run_traffic

MAX_NAME = 32  # PROTOCOL.md: a group name is 1 to 32 characters


@dataclass(slots=True)
class GroupOptions(TrafficOptions):
    group_size: int = 10


def group_name(prefix: str, size: int, k: int) -> str:
    return f"{prefix}-g{size}-{k}"


async def _found(creator: TrafficUser, name: str) -> int:
    """The id of the group `name` of which `creator` is a member, created when there is none."""
    gid = creator.groups.get(name)
    if gid is None:
        reply = await creator.request("create_group", name=name, desc="clusterchat bench")
        gid = int(reply["group"]["id"])
        creator.groups[name] = gid
    return gid


async def _join(u: TrafficUser, name: str, gid: int) -> None:
    await u.request("join_group", group_id=gid)
    u.groups[name] = gid


def _arranger(size: int) -> Scenario:
    async def arrange(run: TrafficRun, users: list[TrafficUser]) -> str:
        groups = [users[i:i + size] for i in range(0, len(users), size)]
        names = [group_name(run.options.prefix, size, k) for k in range(len(groups))]
        run.scenario.extra["groups_created"] = sum(
            1 for members, name in zip(groups, names, strict=True) if name not in members[0].groups)
        ids = await each([_found(members[0], name) for members, name in zip(groups, names, strict=True)],
                         "creating groups")
        joins = [_join(u, name, gid) for members, name, gid in zip(groups, names, ids, strict=True)
                 for u in members[1:] if u.groups.get(name) != gid]
        await each(joins, "joining groups")
        for members, gid in zip(groups, ids, strict=True):
            for u in members:
                u.prepare(f'"group_id":{gid}')
        return f"{len(groups)} groups of {size}"

    return Scenario("group", "group_send", size - 1, arrange)


async def run_group(o: GroupOptions) -> int:
    size = o.group_size
    if size < 2:
        print("bench group: --group-size must be at least 2", file=sys.stderr)
        return 2
    if o.users < size or o.users % size:
        print(f"bench group: --users must be a multiple of --group-size ({size})", file=sys.stderr)
        return 2
    if len(group_name(o.prefix, size, o.users // size - 1)) > MAX_NAME:
        print(f"bench group: --prefix {o.prefix!r} is too long for group names of {MAX_NAME} characters",
              file=sys.stderr)
        return 2
    scenario = _arranger(size)
    scenario.extra.update(group_size=size, groups=o.users // size)
    return await run_traffic(o, scenario)


__all__ = ["GroupOptions", "run_group"]
