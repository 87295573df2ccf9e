"""The message writer's batch transaction on every database, in-process: ids, seqs, cmids and
acks of one batch (PostgreSQL writes it in one call of its own function, storage/pg_batch.py;
MySQL/MariaDB statement by statement; SQLite through its message log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, DisconnectionError

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable
from clusterchat.storage.engine import Database
from clusterchat.storage.inbox import MessageStore, MessageWriter
from clusterchat.storage.records import CMID_WINDOW_MS, StoredMessage

USERS = (1, 2, 3)


class Writer:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.writer = MessageWriter(db)
        self.store = MessageStore(db, self.writer)
        self.task: asyncio.Task[None] | None = None

    def send(self, sender: int, to: int, body: str, cmid: str | None = None) -> asyncio.Future[StoredMessage]:
        return self.writer.send(sender, f"u{sender}", to_user=to, group_id=None, recipients=[to], text=body,
                                cmid=cmid)

    async def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        await self.writer.applied()
        async with self.db.writer.begin() as conn:
            result = await conn.execute(text(statement), params)
            return [tuple(row) for row in result.fetchall()] if result.returns_rows else []

    async def state(self) -> list[tuple[int, int, int]]:
        rows = await self.sql("SELECT user_id, last_seq, acked_seq FROM inbox_state ORDER BY user_id")
        return [(int(u), int(last), int(acked)) for u, last, acked in rows]


@pytest.fixture
async def writer(db_url: str) -> AsyncIterator[Writer]:
    db = Database(db_url)
    await db.upgrade()
    async with db.writer.begin() as conn:
        for user_id in USERS:
            await conn.execute(text("INSERT INTO users (id, name, password_hash, created_at) VALUES (:i, :n, 'x', 0)"),
                               {"i": user_id, "n": f"u{user_id}"})
            await conn.execute(text("INSERT INTO inbox_state (user_id, last_seq, acked_seq) VALUES (:i, 0, 0)"),
                               {"i": user_id})
    w = Writer(db)
    await w.writer.open()
    w.task = asyncio.create_task(w.writer.run())
    yield w
    w.writer.close()
    await asyncio.wait_for(w.task, 10)
    await db.close()


async def test_one_batch_of_fresh_sends_retries_twins_and_acks(writer: Writer) -> None:
    first = await writer.send(1, 2, "before", cmid="a")
    # One batch: a fresh send, a retry of an earlier cmid, a cmid twice, a send to 1, an ack.
    writer.writer.ack(2, 1)
    futures = [writer.send(1, 2, "fresh"), writer.send(1, 2, "before again", cmid="a"),
               writer.send(3, 2, "twin", cmid="t"), writer.send(3, 2, "twin", cmid="t"), writer.send(2, 1, "back")]
    fresh, retry, twin1, twin2, back = await asyncio.gather(*futures)
    assert retry.id == first.id and retry.duplicate and retry.deliveries == []
    assert twin2.id == twin1.id and twin2.duplicate
    assert [fresh.id, twin1.id, back.id] == [first.id + 1, first.id + 2, first.id + 3]
    assert fresh.deliveries == [(2, 2)] and twin1.deliveries == [(2, 3)] and back.deliveries == [(1, 1)]
    assert await writer.state() == [(1, 1, 0), (2, 3, 1), (3, 0, 0)]
    rows = await writer.sql("SELECT user_id, seq, message_id FROM inbox ORDER BY user_id, seq")
    assert [tuple(map(int, r)) for r in rows] == [
        (1, 1, back.id), (2, 1, first.id), (2, 2, fresh.id), (2, 3, twin1.id)]
    texts = await writer.sql("SELECT id, text, peer_lo, peer_hi FROM messages ORDER BY id")
    assert [(int(i), t, lo, hi) for i, t, lo, hi in texts] == [
        (first.id, "before", 1, 2), (fresh.id, "fresh", 1, 2), (twin1.id, "twin", 2, 3), (back.id, "back", 1, 2)]
    cmids = await writer.sql("SELECT sender_id, cmid, message_id FROM message_cmids ORDER BY sender_id")
    assert [(int(s), c, int(m)) for s, c, m in cmids] == [(1, "a", first.id), (3, "t", twin1.id)]


async def test_acks_alone_never_pass_the_last_seq_and_never_move_back(writer: Writer) -> None:
    for i in range(3):
        await writer.send(1, 2, f"m{i}")
    writer.writer.ack(2, 99)  # past the last seq: clamped to it
    await writer.writer.acks_saved(2)
    assert await writer.state() == [(1, 0, 0), (2, 3, 3), (3, 0, 0)]
    writer.writer.ack(2, 1)  # lower than what is stored: nothing moves back
    await writer.writer.acks_saved(2)
    assert await writer.state() == [(1, 0, 0), (2, 3, 3), (3, 0, 0)]


async def test_a_cmid_past_its_window_is_a_new_message(writer: Writer) -> None:
    old = await writer.send(1, 2, "old", cmid="c")
    await writer.sql("UPDATE message_cmids SET ts = :ts", ts=now_ms() - CMID_WINDOW_MS - 1000)
    new = await writer.send(1, 2, "new", cmid="c")
    assert new.id > old.id and not new.duplicate and new.deliveries == [(2, 2)]
    again = await writer.send(1, 2, "new", cmid="c")
    assert again.id == new.id and again.duplicate
    cmids = await writer.sql("SELECT sender_id, cmid, message_id FROM message_cmids")
    assert [(int(s), c, int(m)) for s, c, m in cmids] == [(1, "c", new.id)]


@pytest.mark.parametrize("db_backend", ["postgresql", "mariadb"], indirect=True)
async def test_the_writer_gets_a_new_connection_when_the_server_killed_its_own(writer: Writer) -> None:
    """The message writer keeps one connection and does not ping it before each batch (on
    asyncpg a ping is three round trips). A connection the server ended while it was idle
    (a restart, an administrator) is replaced and nobody sees an error: on PostgreSQL the
    driver has seen it closed before the next batch's call; on MariaDB the batch's first
    statement fails, before COMMIT, so nothing was written and the batch runs again."""
    before = await writer.send(1, 2, "before")
    async with writer.db.writer.connect() as conn:  # every other session of this database, the writer's too
        if writer.db.dialect == "postgresql":
            # The 5 s timeout waits until each backend has exited (and closed its socket).
            await conn.execute(text("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"))
        else:
            rows = await conn.execute(text("SELECT id FROM information_schema.processlist "
                                           "WHERE id <> CONNECTION_ID() AND db = DATABASE()"))
            for (thread_id,) in rows.fetchall():
                await conn.execute(text(f"KILL CONNECTION {int(thread_id)}"))
    await asyncio.sleep(0.2)  # the end of the connection reaches the writer's side while it is idle
    after = await writer.send(1, 2, "after")
    assert after.id == before.id + 1
    texts = await writer.sql("SELECT text FROM messages ORDER BY id")
    assert [t for (t,) in texts] == ["before", "after"]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_a_postgresql_batch_whose_connection_dies_during_the_call_is_not_run_again(writer: Writer) -> None:
    """On PostgreSQL a batch is one call outside any transaction block: a connection that
    dies during it may have committed it, so it is not run again (a resend with the same
    cmid is answered with the first id; a second run could store it twice). The error
    reaches the caller, which answers `unavailable`; the next batch gets a new connection."""
    attempts = 0

    def kill_own_connection(cursor: Any) -> None:
        nonlocal attempts
        attempts += 1
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(Exception) as failure:
        await asyncio.wait_for(writer.db.run_autocommit(kill_own_connection), 30)
    assert attempts == 1, (attempts, repr(failure.value))
    assert isinstance(failure.value, DisconnectionError), repr(failure.value)
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_sends_of_a_postgresql_batch_cut_off_by_a_lost_connection_fail_unavailable(writer: Writer) -> None:
    """A batch of several sends whose connection is lost during the call: every send fails
    with `unavailable` (the client resends); none is retried on its own, which could store a
    message twice had the call committed. Here it had not: nothing is stored."""
    async with writer.db.writer.connect() as blocker, writer.db.writer.connect() as watcher:
        await blocker.execute(text("SELECT user_id FROM inbox_state WHERE user_id = 2 FOR UPDATE"))
        futures = [writer.send(1, 2, "cut 1"), writer.send(3, 2, "cut 2")]
        pid = None
        for _ in range(200):  # the batch waits for the row lock
            pid = (await watcher.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%cc_store_batch%'"))).scalar()
            await watcher.rollback()  # a new snapshot of pg_stat_activity next time
            if pid is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None
        await watcher.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
        await blocker.rollback()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert await writer.sql("SELECT text FROM messages") == []
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_postgresql_batches_reach_rows_by_primary_key_whatever_the_statistics(writer: Writer) -> None:
    """The batch function's statements run with generic plans (made once per connection).
    A generic plan made while a table was small or never analyzed once joined the batch's
    arrays with a full scan of the table: of `message_cmids` (which grows by every message;
    at 2,500 msgs/s that statement took 4.8 ms of a batch's ~14, measured) and of
    `inbox_state` (a row per user). Every row a batch looks up, locks or updates must be
    reached through the primary key, whatever PostgreSQL knows of the table: the plans of
    every statement inside the function, as auto_explain logs them, say so."""
    await writer.send(1, 2, "old", cmid="old")
    await writer.sql("UPDATE message_cmids SET ts = :ts", ts=now_ms() - CMID_WINDOW_MS - 1000)
    plans: list[str] = []
    async with writer.db.writer.connect() as conn:
        raw = await conn.get_raw_connection()
        pg = raw.driver_connection
        assert pg is not None
        pg.add_log_listener(lambda _conn, message: plans.append(message.message))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_nested_statements = on", "SET client_min_messages = log"):
            await pg.execute(setting)
        # A fresh send to two users, a cmid past its window (deleted), a cmid seen before, acks.
        rows = await pg.fetch(
            "SELECT * FROM cc_store_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            now_ms(), CMID_WINDOW_MS, [1, 1, 3], [None, 2, None], [None, None, None], [None, 1, None],
            [None, 2, None], ["group", "again", "new"], ["g", "old", "old"], [1, 1, 2, 3], [2, 3, 2, 1], [2, 3], [1, 9])
        await pg.execute("SELECT 1")  # the log messages of the call have arrived
    assert sorted((r["o_send"], r["o_duplicate"], r["o_user"], r["o_seq"]) for r in rows) == [
        (1, False, 2, 2), (1, False, 3, 1), (2, False, 2, 3), (3, False, 1, 1)]
    nested = [plan for plan in plans if "cc_store_batch" not in plan.split("\n", 2)[1]]
    assert len(nested) >= 4, plans  # the lock, the cmid probes, a DELETE, the writing statement
    joined = "\n".join(nested)
    assert "Index Scan using message_cmids_pkey" in joined, joined
    assert "Index Scan using inbox_state_pkey" in joined, joined
    for plan in nested:
        assert "Seq Scan on message_cmids" not in plan, plan
        assert "Seq Scan on inbox_state" not in plan, plan


@pytest.mark.parametrize("db_backend", ["postgresql", "mariadb"], indirect=True)
async def test_a_write_whose_connection_dies_every_time_is_retried_once_then_fails(writer: Writer) -> None:
    """The retry after a lost connection is one retry: a transaction that loses its
    connection again fails with the driver's error (which the message writer answers with
    `unavailable`) instead of looping."""
    attempts = 0

    def kill_own_connection(cursor: Any) -> None:
        nonlocal attempts
        attempts += 1
        if writer.db.dialect == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        else:
            cursor.execute("SELECT CONNECTION_ID()")
            (thread_id,) = cursor.fetchone()
            cursor.execute(f"KILL CONNECTION {int(thread_id)}")
        cursor.execute("SELECT 1")  # on a connection the server has ended

    with pytest.raises(Exception) as failure:
        await asyncio.wait_for(writer.db.run_write(kill_own_connection), 30)
    assert attempts == 2, (attempts, repr(failure.value))
    # A database error (the driver's own, or SQLAlchemy's wrapping of it): the writer answers unavailable.
    assert isinstance(failure.value, (DBAPIError, *writer.db.driver_errors)), repr(failure.value)
    # The writer's next batch gets a new connection.
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]
