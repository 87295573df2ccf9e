"""The message writer's batch transaction on every database, in-process: ids, seqs, cmids and
acks of one batch (PostgreSQL writes it in its own four round trips, storage/pg_batch.py;
MySQL/MariaDB statement by statement; SQLite through its message log)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from clusterchat.clock import now_ms
from clusterchat.errors import Unavailable, as_chat_error
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

    async def batch_backend_pid(self) -> int:
        """PostgreSQL: the server process behind the message writer's held connection."""
        pid: int = await self.db.run_batch(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
        return pid

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
    asyncpg a ping is three round trips). A connection the server ended fails the batch's
    first statement, before COMMIT: nothing was written, so the batch runs again on a new
    connection and nobody sees an error."""
    before = await writer.send(1, 2, "before")
    async with writer.db.writer.connect() as conn:  # every other session of this database, the writer's too
        if writer.db.dialect == "postgresql":
            await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"))
        else:
            rows = await conn.execute(text("SELECT id FROM information_schema.processlist "
                                           "WHERE id <> CONNECTION_ID() AND db = DATABASE()"))
            for (thread_id,) in rows.fetchall():
                await conn.execute(text(f"KILL CONNECTION {int(thread_id)}"))
    after = await writer.send(1, 2, "after")
    assert after.id == before.id + 1
    texts = await writer.sql("SELECT text FROM messages ORDER BY id")
    assert [t for (t,) in texts] == ["before", "after"]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_postgresql_batches_reach_rows_by_primary_key_whatever_the_statistics(writer: Writer) -> None:
    """The batch's statements are prepared once per connection and PostgreSQL keeps a
    generic plan for each. Planned while a table was small or never analyzed, a join with
    the batch's arrays became a hash join over a full scan of the table: of `message_cmids`
    (which grows by every message; at 2,500 msgs/s that statement took 4.8 ms of a batch's
    ~14, measured) and of `inbox_state` (a row per user). Every row a batch looks up or
    updates must be reached through the primary key, whatever PostgreSQL knows of the table."""
    from clusterchat.storage.pg_batch import _WRITE_ORDER, PgBatch

    batch = PgBatch(writer.db.writer.dialect)
    types = {"n": "BIGINT", "ts": "BIGINT", "m_text": "TEXT[]", "x_cmid": "TEXT[]"}
    values = {"n": "1", "ts": "1", "m_text": "'{a}'", "x_cmid": "'{c}'"}
    async with writer.db.writer.connect() as conn:
        await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        await conn.exec_driver_sql(f"PREPARE find(BIGINT[], BIGINT[], TEXT[]) AS {batch.lock_and_find}")
        await conn.exec_driver_sql(
            f"PREPARE store({', '.join(types.get(k, 'BIGINT[]') for k in _WRITE_ORDER)}) AS {batch.store}")
        plans = {}
        for name, args in (("find", "'{1,2}', '{1,3}', '{a,b}'"),
                           ("store", ", ".join(values.get(k, "'{1}'") for k in _WRITE_ORDER))):
            rows = await conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({args})")
            plans[name] = "\n".join(row[0] for row in rows)
    assert "Index Scan using message_cmids_pkey" in plans["find"], plans["find"]
    assert "Index Cond: (user_id = ANY" in plans["store"], plans["store"]
    for plan in plans.values():
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


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_a_postgresql_batch_whose_connection_dies_every_time_is_retried_once_then_fails(writer: Writer) -> None:
    """`run_batch` (asyncpg's own connection, no adapter in between) keeps `run_write`'s
    contract: one retry after a lost connection, then the adapter's DBAPI error, which the
    writer answers with `unavailable`; the next batch gets a new connection."""
    attempts = 0

    async def kill_own_connection(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        with contextlib.suppress(Exception):  # the server ends the session while answering
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        await conn.fetchval("SELECT 1")  # on a connection the server has ended

    with pytest.raises(Exception) as failure:
        await asyncio.wait_for(writer.db.run_batch(kill_own_connection), 30)
    assert attempts == 2, (attempts, repr(failure.value))
    assert isinstance(failure.value, writer.db.driver_errors), repr(failure.value)
    assert isinstance(as_chat_error(failure.value), Unavailable), repr(failure.value)
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_a_postgresql_batch_that_fails_is_rolled_back_and_not_retried(writer: Writer) -> None:
    """A statement error is not a lost connection: raised at once as the adapter's error,
    everything the batch wrote before it rolled back, and the held connection used again."""
    attempts = 0

    async def insert_then_fail(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO counters (name, value) VALUES ('half', 1)")
        await conn.execute("INSERT INTO counters (name, value) VALUES ('half', 2)")  # primary key taken

    with pytest.raises(Exception) as failure:
        await writer.db.run_batch(insert_then_fail)
    assert attempts == 1
    assert isinstance(failure.value, writer.db.driver_errors), repr(failure.value)
    assert as_chat_error(failure.value) is None  # a bug or bad row, not an outage
    assert await writer.sql("SELECT value FROM counters WHERE name = 'half'") == []
    pid_before = await writer.batch_backend_pid()
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]
    assert await writer.batch_backend_pid() == pid_before


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_a_postgresql_batch_that_fails_at_commit_is_never_run_again(writer: Writer) -> None:
    """A failure at COMMIT may follow a commit (a lost connection), so the batch fails
    (`unavailable` when the connection was lost) and is not run again. Here a deferred
    constraint fails the COMMIT itself; the writer's next batch gets a new connection."""
    await writer.sql("CREATE TABLE deferred_check (k INT, CONSTRAINT one_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)")
    attempts = 0

    async def fail_at_commit(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO deferred_check (k) VALUES (1), (1)")  # checked at COMMIT

    with pytest.raises(Exception) as failure:
        await writer.db.run_batch(fail_at_commit)
    assert attempts == 1
    assert isinstance(failure.value, writer.db.driver_errors), repr(failure.value)
    assert await writer.sql("SELECT count(*) FROM deferred_check") == [(0,)]
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
async def test_a_postgresql_connection_whose_rollback_failed_is_never_used_again(
        writer: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed batch the transaction is rolled back; if even that fails, the
    connection's state is unknown, and the next batch runs on a new one."""
    import asyncpg.transaction

    pid = await writer.batch_backend_pid()

    async def broken_rollback(self: Any) -> None:
        raise OSError("rollback failed")

    async def fail(conn: Any) -> None:
        await conn.execute("SELECT 1/0")

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.transaction.Transaction, "rollback", broken_rollback)
        with pytest.raises(Exception) as failure:
            await writer.db.run_batch(fail)
    assert isinstance(failure.value, writer.db.driver_errors), repr(failure.value)
    assert await writer.batch_backend_pid() != pid
    sent = await writer.send(1, 2, "after")
    assert sent.deliveries == [(2, 1)]
