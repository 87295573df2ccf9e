"""`clusterchat bench`: against a real node, the baseline router, a fake node that loses messages; its accounting."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from clusterchat.bench.conn import BenchConn, source_address, ws_frame
from clusterchat.bench.stats import LatencyLog, LatencySummary, SenderLedger, account_losses, percentile
from support.node import NodeProcess

sqlite_only = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clusterchat", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


# ---------------------------------------------------------------------------- against a real node


@sqlite_only
@pytest.mark.parametrize("transport,extra", [
    ("tcp", ()),
    ("tcp", ("--window", "4")),
    ("ws", ()),
    ("tcp", ("--rate", "300", "--arrival", "poisson")),
], ids=["tcp-closed", "tcp-window4", "ws-closed", "tcp-open"])
def test_direct_delivers_everything(node: NodeProcess, tmp_path: Path, transport: str, extra: tuple[str, ...]) -> None:
    out = tmp_path / "direct.json"
    port = node.port if transport == "tcp" else node.ws_port
    proc = bench("direct", "--target", f"{node.host}:{port}", "--transport", transport, "--users", "20",
                 "--duration", "2", "--warmup", "1", "--json", str(out), "--server-pid", str(node.pid), *extra)
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["sent_ok"] > 0
    assert result["received"] == result["sent_ok"] == result["sent"]
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["reordered"] == 0
    assert result["errors"] == {}
    assert result["msgs_per_s"] > 0 and result["received_in_window"] > 0
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["reply_latency_ms"]["count"] > 0
    assert result["cpu"]["server_pct"][0] > 0
    assert "LOST" not in proc.stdout + proc.stderr
    assert "msgs/s" in proc.stdout and "latency ms" in proc.stdout  # the table
    assert "recv" in proc.stderr  # the progress lines


@sqlite_only
def test_direct_reuses_users_and_clears_leftovers(node: NodeProcess, tmp_path: Path) -> None:
    """A second run with the same names: already registered, already friends; both clean."""
    for _ in range(2):
        out = tmp_path / "direct.json"
        proc = bench("direct", "--target", f"{node.host}:{node.port}", "--users", "4", "--duration", "1",
                     "--warmup", "0", "--prefix", "again", "--json", str(out), "--quiet")
        assert proc.returncode == 0, explain(proc)
        result = json.loads(out.read_text())
        assert result["lost"] == 0 and result["received"] == result["sent_ok"] > 0


@sqlite_only
def test_several_targets_and_source_addresses(node: NodeProcess, tmp_path: Path) -> None:
    """Users spread round-robin over targets, and over 127.0.0.x sources past --per-source."""
    out = tmp_path / "direct.json"
    target = f"{node.host}:{node.port}"
    proc = bench("direct", "--target", target, "--target", target, "--users", "4", "--per-source", "2",
                 "--duration", "1", "--warmup", "0", "--json", str(out), "--quiet")
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["targets"] == [target, target]
    assert result["lost"] == 0 and result["received"] == result["sent_ok"] > 0
    assert "from tcp:127.0.0.1:" in node.log_text and "from tcp:127.0.0.2:" in node.log_text


@sqlite_only
def test_idle_reports_memory_per_connection(node: NodeProcess, tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    proc = bench("idle", "--target", f"{node.host}:{node.port}", "--users", "50", "--server-pid", str(node.pid),
                 "--settle", "1", "--json", str(out))
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["connected"] == result["logged_in"] == result["open_at_end"] == 50
    assert result["server_rss_before"] > 0
    assert result["kib_per_session"] > 0
    assert "KiB/session" in proc.stdout
    # A second run reuses the registered names.
    proc = bench("idle", "--target", f"{node.host}:{node.port}", "--users", "50", "--settle", "0.2", "--quiet")
    assert proc.returncode == 0, explain(proc)
    assert "50 of 50" in proc.stdout


@sqlite_only
def test_slow_users_ping_within_the_idle_timeout(start_node: Any, tmp_path: Path) -> None:
    """Each user sends every ~4 s to a node that drops connections silent for 2 s: pings keep them."""
    node = start_node("--rate-limit", "0", "--idle-timeout", "2")
    out = tmp_path / "direct.json"
    proc = bench("direct", "--target", f"{node.host}:{node.port}", "--users", "4", "--rate", "1",
                 "--duration", "4", "--warmup", "0", "--ping-interval", "0.5", "--json", str(out), "--quiet")
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["disconnects"] == 0 and result["errors"] == {} and result["lost"] == 0
    proc = bench("idle", "--target", f"{node.host}:{node.port}", "--users", "10", "--settle", "0.5",
                 "--hold", "3", "--ping-interval", "0.5", "--quiet")
    assert proc.returncode == 0, explain(proc)
    assert "still open at the end 10" in proc.stdout


# ---------------------------------------------------------------------------- against the baseline router


def test_direct_runs_unchanged_against_the_baseline(tmp_path: Path) -> None:
    """`bench baseline` speaks enough of the protocol for `bench direct`, twice with the same names."""
    router = subprocess.Popen([sys.executable, "-m", "clusterchat", "bench", "baseline", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert router.stdout is not None and router.stderr is not None
        line = router.stdout.readline()
        assert line.startswith("clusterchat baseline listening on tcp://127.0.0.1:"), line + router.stderr.read()
        target = line.strip().rsplit("/", 1)[1]
        for _ in range(2):  # the second run finds the users registered and befriended
            out = tmp_path / "direct.json"
            proc = bench("direct", "--target", target, "--users", "20", "--duration", "2", "--warmup", "0.5",
                         "--json", str(out), "--quiet")
            assert proc.returncode == 0, explain(proc)
            result = json.loads(out.read_text())
            assert result["received"] == result["sent_ok"] == result["sent"] > 0
            assert result["lost"] == 0 and result["duplicated"] == 0 and result["errors"] == {}
        router.send_signal(signal.SIGTERM)
        assert router.wait(10) == 0, router.stderr.read()
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()


# ---------------------------------------------------------------------------- against a faulty fake node

_decode = msgspec.json.Decoder().decode_lines
_encode = msgspec.json.Encoder().encode


class FakeNode(asyncio.Protocol):
    """Just enough of a node for the bench: every request is ok, direct messages are forwarded.

    Every `drop_every`-th message is confirmed but never delivered, every `dup_every`-th is
    delivered twice.
    """

    users: dict[str, int]
    online: dict[int, FakeNode]
    counter: itertools.count[int]

    def __init__(self, drop_every: int, dup_every: int) -> None:
        self.drop_every = drop_every
        self.dup_every = dup_every
        self.tail = b""
        self.uid = 0
        self.seq = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        data = self.tail + data
        end = data.rfind(b"\n") + 1
        self.tail = data[end:]
        for m in _decode(data[:end]) if end else []:
            reply: dict[str, Any] = {"op": m["op"], "ok": True}
            if "rid" in m:
                reply["rid"] = m["rid"]
            if m["op"] in ("register", "login"):
                uid = self.users.setdefault(m["name"], len(self.users) + 1)
                if m["op"] == "login":
                    self.uid = uid
                    self.online[uid] = self
                    reply.update(user={"id": uid, "name": m["name"]}, token="t", friends=[], groups=[],
                                 friend_requests=[], offline=[], more=False)
            elif m["op"] == "send":
                n = next(self.counter)
                reply.update(id=n, ts=1)
                peer = self.online.get(m["to"])
                copies = 0 if n % self.drop_every == 0 else 2 if n % self.dup_every == 0 else 1
                for _ in range(copies):
                    assert peer is not None and peer.transport is not None
                    peer.seq += 1
                    peer.transport.write(_encode({"event": "message", "seq": peer.seq, "id": n,
                                                  "from": {"id": self.uid, "name": "x"}, "to": m["to"],
                                                  "text": m["text"], "ts": 1}) + b"\n")
            self.transport.write(_encode(reply) + b"\n")


async def test_loss_and_duplicates_are_reported_loudly() -> None:
    FakeNode.users, FakeNode.online, FakeNode.counter = {}, {}, itertools.count(1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeNode(drop_every=50, dup_every=70), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clusterchat", "bench", "direct", "--target", f"127.0.0.1:{port}",
            "--users", "6", "--duration", "1", "--warmup", "0", "--drain", "0.5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        server.close()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 3, out + err
    sent = next(int(line.split()[2]) for line in out.splitlines() if line.strip().startswith("sent (ok)"))
    lost = next(int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("lost"))
    assert sent > 100
    assert lost == sent // 50  # every 50th, exactly
    assert f"LOST {lost} MESSAGES" in out and f"LOST {lost} MESSAGES" in err
    assert "DUPLICATED" in err


# ---------------------------------------------------------------------------- accounting, unit by unit


def test_account_losses_counts_lost_duplicated_failed_and_unanswered() -> None:
    a, b = SenderLedger(0), SenderLedger(1)
    a.next_counter = 11  # sent 1..10
    a.failed = {3}
    a.pending = {10: 0}
    b.next_counter = 6  # sent 1..5
    received = {SenderLedger.key(0, c) for c in (1, 2, 4, 5, 6, 7, 8)}  # 9 lost
    received |= {SenderLedger.key(0, 3)}  # failed, yet arrived
    received |= {SenderLedger.key(1, c) for c in (1, 2, 3, 5)}  # 4 lost
    report = account_losses([a, b], received, duplicated=2)
    assert report.sent == 15
    assert report.failed == 1 and report.unanswered == 1
    assert report.confirmed == 13
    assert report.lost == 2
    assert report.unconfirmed_received == 1
    assert report.received == 12
    assert report.duplicated == 2
    assert report.lost_examples == ["user#0 message #9", "user#1 message #4"]


def test_nothing_lost_when_everything_arrives() -> None:
    a = SenderLedger(7)
    a.next_counter = 1001
    report = account_losses([a], {SenderLedger.key(7, c) for c in range(1, 1001)}, 0)
    assert report.lost == 0 and report.received == report.confirmed == 1000


def test_percentiles_and_windows() -> None:
    assert percentile([], 99) == 0
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    log = LatencyLog()
    log.samples.extend([5_000_000] * 10)  # warmup
    log.start_window()
    log.samples.extend(range(1_000_000, 101_000_000, 1_000_000))  # 1..100 ms
    log.end_window()
    log.samples.extend([9_000_000_000])  # drain
    s = LatencySummary.of(log.window())
    assert (s.count, s.p50, s.p99, s.max) == (100, 50.0, 99.0, 100.0)
    assert len(log.tick()) == 111 and len(log.tick()) == 0


def test_websocket_frames_split_across_reads() -> None:
    conn = BenchConn(0, websocket=True)
    big = b'{"event":"x","text":"' + b"a" * 300 + b'"}'
    stream = (bytes((0x81, len(b'{"op":"a"}'))) + b'{"op":"a"}'
              + bytes((0x81, 126)) + len(big).to_bytes(2, "big") + big
              + bytes((0x01, 3)) + b'{"o' + bytes((0x80, 7)) + b'p":"b"}')
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        got.extend(conn._ws_feed(stream[i:i + 7]))
    assert got == [b'{"op":"a"}', big, b'{"op":"b"}']
    assert ws_frame(b"hi") == b"\x81\x82\0\0\0\0hi"
    assert ws_frame(b"x" * 200)[:4] == b"\x81\xfe\x00\xc8"


def test_source_addresses_spread_only_when_needed() -> None:
    assert source_address(5, 20000, "127.0.0.1", 20000) is None
    assert source_address(5, 30000, "127.0.0.1", 20000) == "127.0.0.1"
    assert source_address(25000, 30000, "127.0.0.1", 20000) == "127.0.0.2"
    assert source_address(25000, 30000, "localhost", 20000) == "127.0.0.2"
    assert source_address(25000, 30000, "10.1.2.3", 20000) is None
