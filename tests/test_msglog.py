"""The SQLite message log (storage/msglog.py): a send is committed to the log and answered,
its rows reach the tables later; reads never see the difference, a crash loses nothing and
applies nothing twice, and a failed apply is retried without losing or reordering anything.

These run the message writer in-process on a real SQLite file, with the apply delay made
long where a test needs to catch messages between the log and the tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable
from clusterchat.storage import msglog
from clusterchat.storage.engine import Database
from clusterchat.storage.inbox import MessageStore, MessageWriter
from clusterchat.storage.msglog import LogBatch, LoggedMessage, log_path
from clusterchat.storage.records import CMID_WINDOW_MS, StoredMessage

USERS = (1, 2, 3)


def _sql(path: Path | str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return [tuple(row) for row in conn.execute(statement, args).fetchall()]
    finally:
        conn.close()


async def _new_database(path: Path) -> Database:
    db = Database(f"sqlite:///{path}")
    await db.upgrade()
    for user_id in USERS:
        _sql(path, "INSERT INTO users (id, name, password_hash, created_at) VALUES (?, ?, 'x', 0)",
             (user_id, f"u{user_id}"))
        _sql(path, "INSERT INTO inbox_state (user_id, last_seq, acked_seq) VALUES (?, 0, 0)", (user_id,))
    return db


class Node:
    """A message writer and store on one database, as a node runs them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.writer = MessageWriter(db)
        self.store = MessageStore(db, self.writer)
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> Node:
        await self.writer.open()
        self.task = asyncio.create_task(self.writer.run())
        return self

    async def send(self, sender: int, to: int, text: str, cmid: str | None = None) -> StoredMessage:
        return await self.writer.send(sender, f"u{sender}", to_user=to, group_id=None, recipients=[to],
                                      text=text, cmid=cmid)

    async def close(self) -> None:
        self.writer.close()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.db.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
async def node(path: Path) -> AsyncIterator[Node]:
    running = await Node(await _new_database(path)).open()
    yield running
    if not running.task or not running.task.done():
        await running.close()


def _tables(path: Path) -> list[tuple[Any, ...]]:
    return _sql(path, "SELECT id, sender_id, to_user_id, text FROM messages ORDER BY id")


def _logged(path: Path) -> list[int]:
    return [row[0] for row in _sql(log_path(str(path)), "SELECT id FROM log_batches ORDER BY id")]


async def test_a_send_is_answered_from_the_log_and_a_read_right_after_sees_it(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    first = await node.send(1, 2, "hello")
    second = await node.send(1, 2, "again")
    assert second.id == first.id + 1
    assert second.deliveries == [(2, first.deliveries[0][1] + 1)]
    assert _tables(path) == []  # answered from the log alone
    assert len(_logged(path)) == 2

    page = await node.store.since(2, None, 10)  # waits for the apply, then reads the tables
    assert [(m.id, m.text, m.seq) for m in page.messages] == [(first.id, "hello", 1), (second.id, "again", 2)]
    assert page.last_seq == 2
    assert [row[3] for row in _tables(path)] == ["hello", "again"]
    history = await node.store.history(user_id=1, peer=2, before=None, limit=10)
    assert [m.text for m in history] == ["hello", "again"]


async def test_close_applies_everything_and_empties_the_log(node: Node, path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    sent = [await node.send(1 + i % 2, 2 - i % 2, f"m{i}") for i in range(20)]
    node.writer.ack(2, 5)
    await node.close()
    assert [row[0] for row in _tables(path)] == [s.id for s in sent]
    assert _logged(path) == []
    assert _sql(path, "SELECT user_id, last_seq, acked_seq FROM inbox_state WHERE user_id IN (1, 2) ORDER BY 1") == [
        (1, 10, 0), (2, 10, 5)]


async def test_an_apply_of_acks_alone_moves_acked_seq_and_never_moves_a_seq_back(node: Node, path: Path) -> None:
    """The apply stores each user's last and acked seq in one upsert that only lets them grow."""
    for i in range(3):
        await node.send(1, 2, f"m{i}")
    await node.send(2, 1, "back")
    await node.store.since(2, None, 10)  # applied: 2 has seqs 1..3, 1 has seq 1

    def state() -> list[tuple[Any, ...]]:
        return _sql(path, "SELECT user_id, last_seq, acked_seq FROM inbox_state WHERE user_id IN (1, 2) ORDER BY 1")

    assert state() == [(1, 1, 0), (2, 3, 0)]
    node.writer.ack(2, 2)  # a batch with acks and no messages
    await node.writer.acks_saved(2)
    await node.store.since(2, None, 10)
    assert state() == [(1, 1, 0), (2, 3, 2)]
    node.writer.ack(2, 1)  # lower than what is stored: nothing moves back
    node.writer.ack(1, 1)
    await node.writer.acks_saved(2)
    await node.writer.acks_saved(1)
    await node.store.since(1, None, 10)
    assert state() == [(1, 1, 1), (2, 3, 2)]
    await node.send(1, 2, "more")  # a delivery alone keeps the acked seq
    await node.store.since(2, None, 10)
    assert state() == [(1, 1, 1), (2, 4, 2)]


async def test_recovery_applies_the_batches_after_the_last_applied_one_exactly_once(path: Path) -> None:
    db = await _new_database(path)
    _sql(path, "INSERT INTO chat_groups (id, name, description, creator_id, created_at) VALUES (7, 'g', '', 1, 0)")
    ts = now_ms()
    # What a crash can leave: batch 1 applied (its rows and the counter are in the tables)
    # but not yet trimmed from the log, batches 2 to 4 only in the log (4: a group message).
    _sql(path, "INSERT INTO messages (id, sender_id, to_user_id, peer_lo, peer_hi, text, ts) "
               "VALUES (1, 1, 2, 1, 2, 'one', ?)", (ts,))
    _sql(path, "INSERT INTO inbox (user_id, seq, message_id) VALUES (2, 1, 1)")
    _sql(path, "UPDATE inbox_state SET last_seq = 1 WHERE user_id = 2")
    _sql(path, "UPDATE counters SET value = 1 WHERE name = 'message_id'")
    _sql(path, "INSERT INTO counters (name, value) VALUES ('message_log', 1)")
    batches = [
        LogBatch(1, [LoggedMessage(1, 1, 2, None, "one", ts, None, [(2, 1)])], []),
        LogBatch(2, [LoggedMessage(2, 2, 1, None, "two", ts, "c-2", [(1, 1)]),
                     LoggedMessage(3, 1, 2, None, "three", ts, None, [(2, 2)])], [(1, 0)]),
        LogBatch(3, [], [(2, 1)]),
        LogBatch(4, [LoggedMessage(4, 3, None, 7, 'grüße "🙂"\n\\', ts + 1, "ç-4", [(1, 2), (2, 3)])], [(1, 1)]),
    ]
    log_file = log_path(str(path))
    _sql(log_file, "CREATE TABLE log_batches (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    for batch in batches:
        _sql(log_file, "INSERT INTO log_batches (id, body) VALUES (?, ?)", (batch.id, msglog._encode(batch)))

    node = await Node(db).open()
    assert _sql(path, "SELECT * FROM messages ORDER BY id") == [
        (1, 1, 2, None, 1, 2, "one", ts), (2, 2, 1, None, 1, 2, "two", ts), (3, 1, 2, None, 1, 2, "three", ts),
        (4, 3, None, 7, None, None, 'grüße "🙂"\n\\', ts + 1)]
    assert _sql(path, "SELECT user_id, seq, message_id FROM inbox ORDER BY 1, 2") == [
        (1, 1, 2), (1, 2, 4), (2, 1, 1), (2, 2, 3), (2, 3, 4)]
    assert _sql(path, "SELECT user_id, last_seq, acked_seq FROM inbox_state ORDER BY 1") == [
        (1, 2, 1), (2, 3, 1), (3, 0, 0)]
    assert _sql(path, "SELECT * FROM message_cmids ORDER BY message_id") == [(2, "c-2", 2, ts), (3, "ç-4", 4, ts + 1)]
    # The counters carry on from the recovered batches, and the retried cmids are known.
    fresh = await node.send(2, 1, "five")
    assert (fresh.id, fresh.deliveries) == (5, [(1, 3)])
    retried = await node.send(2, 1, "two again", cmid="c-2")
    assert (retried.id, retried.duplicate) == (2, True)
    await node.close()
    assert _logged(path) == []
    assert _sql(path, "SELECT value FROM counters WHERE name = 'message_log'") == [(5,)]


async def test_a_retried_cmid_gets_its_first_message_before_and_after_the_apply(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    first = await node.send(1, 2, "once", cmid="k")
    pending = await node.send(1, 2, "once", cmid="k")  # still only in the log
    assert (pending.id, pending.duplicate) == (first.id, True)
    await node.writer.applied()
    applied = await node.send(1, 2, "once", cmid="k")  # now found in the table
    assert (applied.id, applied.duplicate) == (first.id, True)
    other = await node.send(2, 1, "once", cmid="k")  # another sender's cmid is another key
    assert not other.duplicate
    await node.writer.applied()
    assert [row[3] for row in _tables(path)] == ["once", "once"]


async def test_a_cmid_past_its_window_is_used_again(node: Node, path: Path) -> None:
    old = now_ms() - CMID_WINDOW_MS - 1000
    _sql(path, "INSERT INTO message_cmids (sender_id, cmid, message_id, ts) VALUES (1, 'old', 999, ?)", (old,))
    fresh = await node.send(1, 2, "new", cmid="old")
    assert not fresh.duplicate and fresh.id != 999
    await node.writer.applied()
    assert _sql(path, "SELECT message_id FROM message_cmids WHERE sender_id = 1 AND cmid = 'old'") == [(fresh.id,)]


async def test_a_failed_apply_fails_the_waiting_read_and_is_retried_without_loss(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    monkeypatch.setattr(msglog, "APPLY_RETRY", 0.05)
    real_apply = msglog.MessageLog._apply
    failures: list[int] = []

    def failing_apply(self: msglog.MessageLog, cursor: Any, batches: Any, *pause: Any) -> None:
        if not failures:
            failures.append(len(batches))
            real_apply(self, cursor, batches, *pause)  # rows written, then the transaction fails
            raise sqlite3.OperationalError("disk I/O error")
        real_apply(self, cursor, batches, *pause)

    monkeypatch.setattr(msglog.MessageLog, "_apply", failing_apply)
    sent = [await node.send(1, 2, f"m{i}") for i in range(3)]
    with pytest.raises(Unavailable):
        await node.store.since(2, None, 10)
    assert failures == [3] and _tables(path) == []  # rolled back
    later = await node.send(1, 2, "m3")  # logged while the failed batches wait for the retry
    for _ in range(100):
        if len(_tables(path)) == 4:
            break
        await asyncio.sleep(0.05)
    page = await node.store.since(2, None, 10)
    assert [m.id for m in page.messages] == [s.id for s in [*sent, later]]
    assert [m.seq for m in page.messages] == [1, 2, 3, 4]


async def test_seqs_stay_right_when_the_cache_of_last_seqs_is_trimmed_during_an_apply(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    monkeypatch.setattr(msglog, "SEQ_CACHE_MAX", 0)  # trim after every apply
    real_apply = msglog.MessageLog._apply
    applying, release = threading.Event(), threading.Event()

    def held_apply(self: msglog.MessageLog, cursor: Any, batches: Any, *pause: Any) -> None:
        applying.set()
        release.wait(10)
        real_apply(self, cursor, batches, *pause)

    monkeypatch.setattr(msglog.MessageLog, "_apply", held_apply)
    first = await node.send(1, 2, "m1")
    reading = asyncio.create_task(node.store.since(2, None, 10))  # starts an apply of m1, held
    await asyncio.to_thread(applying.wait, 10)
    second = await node.send(1, 2, "m2")  # logged while m1 is being applied: its seq is not in the table yet
    release.set()
    await reading
    third = await node.send(1, 2, "m3")  # after the trim: user 2 must still count from m2
    assert [first.deliveries, second.deliveries, third.deliveries] == [[(2, 1)], [(2, 2)], [(2, 3)]]
    page = await node.store.since(2, None, 10)
    assert [m.seq for m in page.messages] == [1, 2, 3]


async def test_the_log_keeps_only_what_is_not_yet_applied(node: Node, path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)
    for i in range(5):
        await node.send(1, 2, f"m{i}")
    assert len(_logged(path)) == 5
    await node.writer.applied()
    last = await node.send(1, 2, "after")  # the next append drops the applied batches
    assert len(_logged(path)) == 1
    await node.writer.applied()
    assert _tables(path)[-1][0] == last.id


async def test_a_close_that_cannot_apply_leaves_the_batches_for_the_next_start(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 60.0)

    def broken_apply(self: msglog.MessageLog, cursor: Any, batches: Any, *pause: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    real_apply = msglog.MessageLog._apply
    monkeypatch.setattr(msglog.MessageLog, "_apply", broken_apply)
    sent = await node.send(1, 2, "kept")
    writer = node.writer
    await node.close()  # logs a warning, does not hang
    assert _tables(path) == [] and len(_logged(path)) == 1
    with pytest.raises(Unavailable):  # a late read fails at once rather than waiting forever
        await asyncio.wait_for(writer.applied(), 5)

    monkeypatch.setattr(msglog.MessageLog, "_apply", real_apply)
    again = await Node(Database(f"sqlite:///{path}")).open()
    page = await again.store.since(2, None, 10)
    assert [(m.id, m.text) for m in page.messages] == [(sent.id, "kept")]
    await again.close()


async def test_an_apply_on_the_timer_pauses_between_statements_and_a_reader_ends_the_pauses(
        node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msglog, "APPLY_DELAY", 0.01)
    monkeypatch.setattr(msglog, "PAUSE_MIN", 1.0)  # 7 statements: 7 s of pauses, if all were taken
    real_pause = msglog.MessageLog._pause
    pauses: list[bool] = []  # whether each pause was still taken (nobody in a hurry)
    started = threading.Event()

    def recorded_pause(self: msglog.MessageLog, elapsed: float) -> None:
        pauses.append(not self._hurry)
        started.set()
        real_pause(self, elapsed)

    monkeypatch.setattr(msglog.MessageLog, "_pause", recorded_pause)
    sent = await asyncio.gather(*(node.send(1, 2, f"m{i}") for i in range(130)))
    await asyncio.to_thread(started.wait, 10)  # the timer's apply is pausing
    began = asyncio.get_running_loop().time()
    page = await node.store.since(2, None, 200)  # waits for that apply, which stops pausing
    waited = asyncio.get_running_loop().time() - began
    assert [m.id for m in page.messages] == sorted(s.id for s in sent)
    assert pauses[0] is True  # paced until the reader came
    assert pauses[-1] is False  # not after it came
    assert waited < 3.0, waited  # at most the pause under way, not the ones left (6 s)
