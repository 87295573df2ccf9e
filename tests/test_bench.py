"""`clusterchat bench`: against a real node, the baseline router, a fake node that loses messages; its accounting."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from clusterchat.bench.conn import BenchConn, source_address, ws_frame
from clusterchat.bench.stats import (
    Arrival,
    LatencyLog,
    LatencySummary,
    ReceiverLedger,
    SenderLedger,
    account_losses,
    percentile,
)
from support.node import NodeProcess

sqlite_only = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)


def bench(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clusterchat", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0 and len(data) > 1000


def check_percentiles(lat: dict[str, Any]) -> None:
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat


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
def test_receivers_ack_on_their_own_timer(node: NodeProcess, tmp_path: Path) -> None:
    """With --ack-every out of reach, acks come from each receiver's timer: a few per user a
    second, not one per delivery and not only the final flush."""
    out = tmp_path / "direct.json"
    proc = bench("direct", "--target", f"{node.host}:{node.port}", "--users", "4", "--rate", "200",
                 "--duration", "2", "--warmup", "1", "--ack-every", "100000", "--ack-interval", "0.2",
                 "--json", str(out), "--quiet")
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["lost"] == 0 and result["received"] == result["sent_ok"] > 300
    # 4 receivers over ~3 s of load at one ack per 0.2 s each: about 60, plus the final flush.
    assert 4 * 5 < result["acks"] < result["received"] / 3, result["acks"]


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
    # 50 sessions are ~100 KiB, less than the node's own heap moves by while it runs (freed
    # arenas, thread stacks): the figure is only meaningful with thousands of connections, so
    # here it must just be a plausible number, not a sign.
    assert -100 < result["kib_per_session"] < 100, result["kib_per_session"]
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


@sqlite_only
@pytest.mark.parametrize("transport,size,users,extra", [
    ("tcp", 10, 20, ("--window", "2")),
    ("ws", 4, 8, ("--rate", "200")),
], ids=["tcp-closed-10", "ws-open-4"])
def test_group_delivers_to_every_member_but_the_sender(node: NodeProcess, tmp_path: Path, transport: str,
                                                      size: int, users: int, extra: tuple[str, ...]) -> None:
    out = tmp_path / "group.json"
    port = node.port if transport == "tcp" else node.ws_port
    proc = bench("group", "--target", f"{node.host}:{port}", "--transport", transport, "--users", str(users),
                 "--group-size", str(size), "--duration", "2", "--warmup", "1", "--json", str(out),
                 "--server-pid", str(node.pid), *extra)
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert (result["group_size"], result["fanout"], result["groups"]) == (size, size - 1, users // size)
    assert result["groups_created"] == users // size
    assert result["sent_ok"] == result["sent"] > 0
    assert result["received"] == result["expected"] == result["sent_ok"] * (size - 1)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["reordered"] == 0
    assert result["errors"] == {} and result["disconnects"] == 0
    assert result["latency_ms"]["count"] == result["received_in_window"] > 0
    check_percentiles(result["latency_ms"])
    assert result["deliveries_per_s"] > result["msgs_per_s"] > 0
    if "--rate" in extra:  # open loop: 200 messages a second for the 3 s of warmup and window
        assert result["sent"] == pytest.approx(600, rel=0.1)
    assert f"{users // size} groups of {size}" in proc.stdout and "deliveries/s" in proc.stdout
    assert "LOST" not in proc.stdout + proc.stderr
    assert "measure" in proc.stderr and "recv" in proc.stderr  # the progress lines
    assert "server_us_per_msg" in result["cpu"]


@sqlite_only
def test_group_reuses_its_groups_and_plots(node: NodeProcess, tmp_path: Path) -> None:
    """A second run finds the groups of the first; --plot writes a PNG with the numbers in the JSON."""
    target = f"{node.host}:{node.port}"
    for run in range(2):
        out, png = tmp_path / f"group{run}.json", tmp_path / f"group{run}.png"
        proc = bench("group", "--target", target, "--target", target, "--users", "8", "--group-size", "4",
                     "--duration", "1.5", "--warmup", "0.5", "--json", str(out), "--plot", str(png), "--quiet")
        assert proc.returncode == 0, explain(proc)
        result = json.loads(out.read_text())
        assert result["groups_created"] == (2 if run == 0 else 0)
        assert result["received"] == result["expected"] == result["sent_ok"] * 3 > 0 and result["lost"] == 0
        assert_png(png)
        measured = [p for p in result["series"] if p["phase"] == "measure"]
        assert measured and all(p["count"] > 0 and p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] for p in measured)
        assert result["window_s"][1] - result["window_s"][0] == pytest.approx(1.5, abs=0.2)


@sqlite_only
def test_login_logs_in_and_out_on_each_connection(node: NodeProcess, tmp_path: Path) -> None:
    out, png = tmp_path / "login.json", tmp_path / "login.png"
    proc = bench("login", "--target", f"{node.host}:{node.port}", "--users", "12", "--concurrency", "4",
                 "--duration", "2", "--warmup", "0.5", "--json", str(out), "--plot", str(png),
                 "--server-pid", str(node.pid))
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["registered"] == 12 and result["errors"] == {}
    assert result["attempts"] == result["logins_ok"] >= result["logins_in_window"] > 0
    assert result["connections"] == 4  # one a worker: logout keeps it usable
    assert result["logins_per_s"] == pytest.approx(result["logins_in_window"] / result["measured_s"], rel=0.01)
    assert result["latency_ms"]["count"] == result["logins_in_window"]
    check_percentiles(result["latency_ms"])
    assert "server_us_per_login" in result["cpu"]
    assert "logins/s" in proc.stdout and "latency ms" in proc.stdout  # the table
    assert "logins" in proc.stderr and "measure" in proc.stderr  # the progress lines
    assert_png(png)


@sqlite_only
def test_login_open_loop_reconnecting_over_websocket(node: NodeProcess, tmp_path: Path) -> None:
    out = tmp_path / "login.json"
    proc = bench("login", "--target", f"{node.host}:{node.ws_port}", "--transport", "ws", "--users", "10",
                 "--concurrency", "5", "--rate", "20", "--reconnect", "--duration", "2", "--warmup", "0.5",
                 "--json", str(out), "--quiet")
    assert proc.returncode == 0, explain(proc)
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["logins_ok"] == pytest.approx(20 * 2.5, abs=5)  # paced, not as fast as it goes
    assert result["connections"] == result["attempts"] == result["logins_ok"]  # a new connection each
    assert result["connect_latency_ms"]["count"] == result["connections"]


@sqlite_only
def test_login_errors_are_counted_by_code(start_node: Any, tmp_path: Path) -> None:
    """A node left at a low --rate-limit refuses most logins: counted by code, and the run fails."""
    node = start_node("--rate-limit", "2")
    out = tmp_path / "login.json"
    proc = bench("login", "--target", f"{node.host}:{node.port}", "--users", "2", "--concurrency", "1",
                 "--rate", "20", "--duration", "1.5", "--warmup", "0", "--json", str(out), "--quiet")
    assert proc.returncode == 1, explain(proc)
    result = json.loads(out.read_text())
    refused = result["errors"].get("login:rate_limited", 0)
    assert refused > 0 and result["logins_ok"] > 0
    assert result["attempts"] == result["logins_ok"] + refused
    assert set(result["errors"]) <= {"login:rate_limited", "logout:rate_limited"}
    assert "login:rate_limited=" in proc.stdout and "LOGIN ERRORS" in proc.stderr


@sqlite_only
def test_login_with_the_wrong_password_fails_in_setup(node: NodeProcess) -> None:
    target = f"{node.host}:{node.port}"
    first = bench("login", "--target", target, "--users", "2", "--concurrency", "1", "--duration", "0.3",
                  "--warmup", "0", "--prefix", "clash", "--quiet")
    assert first.returncode == 0, explain(first)
    proc = bench("login", "--target", target, "--users", "2", "--concurrency", "1", "--duration", "0.3",
                 "--warmup", "0", "--prefix", "clash", "--password", "another-password", "--quiet")
    assert proc.returncode == 1, explain(proc)
    assert "registering the users failed" in proc.stderr and "bad_credentials" in proc.stderr


def test_plot_without_matplotlib_fails_before_connecting(tmp_path: Path) -> None:
    """Nothing listens on port 9: a scenario that got past the check would fail with 1, not 2."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    png = tmp_path / "x.png"
    for scenario in ("direct", "group", "login"):
        proc = bench(scenario, "--target", "127.0.0.1:9", "--users", "10", "--plot", str(png), env=env)
        assert proc.returncode == 2, explain(proc)
        assert "--plot needs matplotlib" in proc.stderr and "clusterchat[plot]" in proc.stderr
    assert not png.exists()


def test_latency_plot_draws_wide_and_empty_runs(tmp_path: Path) -> None:
    """Latencies over decades get a log histogram; a run with no samples still gets a figure."""
    from clusterchat.bench.plot import latency_plot

    series = [{"t": t + 1.0, "phase": "measure", "count": 100, "p50_ms": 1.0, "p90_ms": 5.0, "p99_ms": 50.0,
               "recv_per_s": 100.0} for t in range(5)]
    series[2]["count"] = 0  # a silent second
    wide = [int(x * 1e6) for x in (0.3, 1, 1, 2, 5, 40, 900)]
    latency_plot(str(tmp_path / "wide.png"), "wide", series, wide, (1.0, 4.0), "recv_per_s", "msgs/s")
    latency_plot(str(tmp_path / "empty.png"), "empty", [], [], (0.0, 0.0), "recv_per_s", "msgs/s")
    assert_png(tmp_path / "wide.png")
    assert_png(tmp_path / "empty.png")


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
    """Just enough of a node for the bench: every request is ok, direct and group messages are forwarded.

    Every `drop_every`-th message is confirmed but never delivered, every `dup_every`-th is
    delivered twice; for group messages, every such delivery (one a recipient).
    """

    users: dict[str, int]
    online: dict[int, FakeNode]
    counter: itertools.count[int]
    groups: dict[int, list[int]]
    deliveries: itertools.count[int]

    @classmethod
    def reset(cls) -> None:
        cls.users, cls.online, cls.counter, cls.groups = {}, {}, itertools.count(1), {}
        cls.deliveries = itertools.count(1)

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
                self.deliver(m["to"], n, n, m["text"], to=m["to"])
            elif m["op"] in ("create_group", "join_group"):
                gid = m.get("group_id") or len(self.groups) + 1
                members = self.groups.setdefault(gid, [])
                members.append(self.uid)
                reply["group"] = {"id": gid, "name": "g", "desc": "", "role": "member", "members": []}
            elif m["op"] == "group_send":
                n = next(self.counter)
                reply.update(id=n, ts=1)
                for member in self.groups[m["group_id"]]:
                    if member != self.uid:
                        self.deliver(member, n, next(self.deliveries), m["text"], group_id=m["group_id"])
            self.transport.write(_encode(reply) + b"\n")

    def deliver(self, uid: int, msg_id: int, nth: int, text: str, **to: int) -> None:
        """The `nth` delivery (or direct message) is dropped or doubled by the rules above."""
        peer = self.online[uid]
        assert peer.transport is not None
        for _ in range(0 if nth % self.drop_every == 0 else 2 if nth % self.dup_every == 0 else 1):
            peer.seq += 1
            peer.transport.write(_encode({"event": "message", "seq": peer.seq, "id": msg_id,
                                          "from": {"id": self.uid, "name": "x"}, **to, "text": text,
                                          "ts": 1}) + b"\n")


async def test_loss_and_duplicates_are_reported_loudly() -> None:
    FakeNode.reset()
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


async def test_group_loss_and_duplicates_are_counted_per_delivery(tmp_path: Path) -> None:
    """Groups of 3: every message owes 2 deliveries; every 50th delivery is dropped, every 70th doubled."""
    FakeNode.reset()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeNode(drop_every=50, dup_every=70), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = tmp_path / "group.json"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clusterchat", "bench", "group", "--target", f"127.0.0.1:{port}",
            "--users", "6", "--group-size", "3", "--duration", "1", "--warmup", "0", "--drain", "0.5",
            "--json", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        server.close()
    text, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 3, text + err
    result = json.loads(out.read_text())
    owed = result["sent_ok"] * 2
    assert result["sent_ok"] > 100 and result["expected"] == owed
    dropped = owed // 50
    doubled = sum(1 for d in range(1, owed + 1) if d % 70 == 0 and d % 50)
    assert result["lost"] == dropped and result["received"] == owed - dropped
    assert result["duplicated"] == doubled and result["reordered"] == 0
    assert f"LOST {dropped} DELIVERIES" in text and f"LOST {dropped} DELIVERIES" in err
    assert f"DUPLICATED {doubled} DELIVERIES" in err


# ---------------------------------------------------------------------------- accounting, unit by unit


def _sent(ledger: SenderLedger, n: int) -> SenderLedger:
    """`ledger` after n sends, all confirmed."""
    for _ in range(n):
        ledger.pending.pop(ledger.next(0))
    return ledger


def test_account_losses_counts_lost_duplicated_failed_and_unanswered() -> None:
    a, b = _sent(SenderLedger(0), 10), _sent(SenderLedger(1), 5)
    a.failed = {3}
    a.pending = {10: 0}
    for c in (1, 2, 4, 5, 6, 7, 8):  # 9 lost
        a.delivered[c] = 1
    a.delivered[3] = 1  # failed, yet arrived
    for c in (1, 2, 3, 5):  # 4 lost
        b.delivered[c] = 1
    report = account_losses([a, b], duplicated=2)
    assert report.sent == 15
    assert report.failed == 1 and report.unanswered == 1
    assert report.confirmed == report.expected == 13
    assert report.lost == 2
    assert report.unconfirmed_received == 1
    assert report.received == 12
    assert report.duplicated == 2
    assert report.lost_examples == ["user#0 message #9", "user#1 message #4"]


def test_account_losses_counts_deliveries_of_a_fan_out() -> None:
    """A group message owes one delivery a recipient: a message that reached 7 of 9 lost 2."""
    a = _sent(SenderLedger(4, fanout=9), 3)
    a.delivered[1] = 9
    a.delivered[2] = 7
    a.delivered[3] = 9
    report = account_losses([a], duplicated=0)
    assert (report.confirmed, report.expected, report.received, report.lost) == (3, 27, 25, 2)
    assert report.lost_examples == ["user#4 message #2 (2 of 9 recipients)"]


def test_nothing_lost_when_everything_arrives() -> None:
    a = _sent(SenderLedger(7, fanout=3), 1000)
    for c in range(1, 1001):
        a.delivered[c] = 3
    report = account_losses([a], 0)
    assert report.lost == 0 and report.received == report.expected == 3000 and report.confirmed == 1000


def test_receiver_ledger_tells_new_late_and_duplicate() -> None:
    seen = ReceiverLedger()
    assert [seen.arrived(1, c) for c in (1, 2, 5)] == [Arrival.NEW] * 3  # 3 and 4 are gaps now
    assert seen.arrived(2, 1) is Arrival.NEW  # another sender: its own counters
    assert seen.arrived(1, 2) is Arrival.DUPLICATE
    assert seen.arrived(1, 4) is Arrival.LATE  # filled a gap: reordered, not a duplicate
    assert seen.arrived(1, 4) is Arrival.DUPLICATE
    assert seen.arrived(1, 5) is Arrival.DUPLICATE
    assert seen.arrived(1, 3) is Arrival.LATE
    assert seen.gaps[1] == set()


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
