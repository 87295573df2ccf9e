#!/usr/bin/env python3
"""What one node pays for another node's commit batch on the broadcast channel.

Every node decodes every batch published on `cc:deliver` and looks its recipients up
in its session map, even when it hosts none of them. This measures that cost per
message (decode + lookup, recipients not hosted here) for batches of direct messages
and of group messages, and the cost when the node does host the recipients (which
then also builds and writes their frames, here into a null session).

    python scripts/bench-bus-decode.py [--batch 200] [--text 80] [--group 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from clusterchat.cluster.codec import Batch, Names, WireMessage, decode, encode
from clusterchat.cluster.hub import ClusterHub


class NullSession:
    """Takes message events and drops them (what `deliver` costs without a socket)."""

    def deliver(self, seq: int, frame: bytes) -> None:
        pass


def batch_of(count: int, text_len: int, recipients: int) -> bytes:
    text = ("lorem ipsum dolor sit amet " * (1 + text_len // 27))[:text_len]
    messages = []
    for k in range(count):
        deliveries: list[int] = []
        for r in range(recipients):
            deliveries += [10_000 + (k * recipients + r) % 5000, 1000 + k]
        messages.append(WireMessage(1_000_000 + k, 42, "sender-name", None if recipients > 1 else 10_000 + k,
                                    7 if recipients > 1 else None, text, 1_763_700_000_000 + k, deliveries))
    return encode(Names("other-node").origin, Batch(messages))


def per_message_us(data: bytes, hub: ClusterHub, count: int, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        origin, payload = decode(data)
        hub.on_payload(origin, payload)
    return (time.perf_counter() - started) / (rounds * count) * 1e6


async def main(args: Any) -> None:
    hub = ClusterHub(lambda coro: asyncio.ensure_future(coro))
    direct = batch_of(args.batch, args.text, 1)
    group = batch_of(max(1, args.batch // 10), args.text, args.group)
    rounds = args.rounds
    print(f"batch of {args.batch} direct messages ({len(direct)} bytes), text {args.text} characters:")
    print(f"  not hosted here: {per_message_us(direct, hub, args.batch, rounds):.2f} µs per message")
    print(f"batch of {max(1, args.batch // 10)} group messages to {args.group} members ({len(group)} bytes):")
    print(f"  not hosted here: {per_message_us(group, hub, max(1, args.batch // 10), rounds):.2f} µs per message")
    for user_id in range(10_000, 15_000):
        hub.sessions[user_id] = NullSession()  # type: ignore[assignment]
    print("every recipient hosted here (frames built, written to a null session):")
    print(f"  direct: {per_message_us(direct, hub, args.batch, rounds):.2f} µs per message")
    print(f"  group:  {per_message_us(group, hub, max(1, args.batch // 10), rounds):.2f} µs per message")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="messages per batch (default %(default)s)")
    parser.add_argument("--text", type=int, default=80, help="characters of text (default %(default)s)")
    parser.add_argument("--group", type=int, default=50, help="members of a group message (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2000, help="batches decoded (default %(default)s)")
    asyncio.run(main(parser.parse_args()))
