"""The SQLite message-batch path of `Database.run_write`: the wait for another writer's lock
never stalls the event loop, a failed batch leaves nothing behind, and driver errors reach
the message writer unwrapped (it treats `db.driver_errors` as storage errors)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import bindparam, insert
from sqlalchemy.dialects import sqlite

from clusterchat.storage.bulk import SQLITE_MAX_ROWS, Bulk
from clusterchat.storage.engine import Database, sqlite_connection
from clusterchat.storage.schema import inbox


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'chat.db'}")
    await database.upgrade()
    yield database
    await database.close()


def _counter(cursor: sqlite3.Cursor, name: str) -> int | None:
    row = cursor.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def _insert_and_read(cursor: sqlite3.Cursor) -> int | None:
    cursor.execute("INSERT INTO counters (name, value) VALUES ('t', 7)")
    return _counter(cursor, "t")


async def test_a_batch_waits_for_another_writer_without_blocking_the_loop(db: Database, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "chat.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock for half a second
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    started = loop.time()
    try:
        value = await db.run_write(_insert_and_read)
    finally:
        done.set()
        await beat
        other.close()
    assert value == 7
    assert loop.time() - started >= 0.45  # it did wait for the lock
    assert max(gaps) < 0.2, max(gaps)  # and the loop kept running meanwhile


async def test_a_failed_batch_is_rolled_back_and_the_next_one_commits(db: Database) -> None:
    def fail(cursor: sqlite3.Cursor) -> None:
        cursor.execute("INSERT INTO counters (name, value) VALUES ('gone', 1)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await db.run_write(fail)
    assert await db.run_write(lambda cursor: _counter(cursor, "gone")) is None
    await db.run_write(lambda cursor: cursor.execute("INSERT INTO counters (name, value) VALUES ('kept', 2)"))
    assert await db.run_write(lambda cursor: _counter(cursor, "kept")) == 2


async def test_a_driver_error_reaches_the_caller_and_the_next_batch_works(db: Database) -> None:
    with pytest.raises(sqlite3.Error):
        await db.run_write(lambda cursor: cursor.execute("INSERT INTO no_such_table VALUES (1)"))
    assert sqlite3.Error in db.driver_errors
    assert await db.run_write(lambda cursor: _counter(cursor, "message_id")) is not None


async def test_the_writer_leaves_checkpoints_to_their_thread_and_the_wal_stays_bounded(
        db: Database, tmp_path: Path) -> None:
    assert await db.run_write(lambda cursor: cursor.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    checkpointer = db._checkpointer
    assert checkpointer is not None
    checkpointer.rewind_frames = 64  # rewind at 256 KiB instead of 64 MiB
    wal = tmp_path / "chat.db-wal"
    text = "x" * 200

    def insert(cursor: sqlite3.Cursor, batch: int) -> None:
        cursor.executemany("INSERT INTO counters (name, value) VALUES (?, ?)",
                           [(f"{batch}-{i}-{text}", i) for i in range(100)])

    largest = 0
    for batch in range(300):  # ~30 pages a batch: ~9,000 pages (36 MiB) if the WAL never started over
        await db.run_write(insert, batch)
        largest = max(largest, wal.stat().st_size)
        if batch % 20 == 0:
            await asyncio.sleep(0.15)  # let the checkpointer run now and then, as a live node does
    assert checkpointer.checkpoints > 0
    assert largest < 8 * 1024 * 1024, largest
    count = await db.run_write(lambda cursor: cursor.execute("SELECT count(*) FROM counters").fetchone()[0])
    assert count >= 300 * 100
    await db.close()
    check = sqlite3.connect(tmp_path / "chat.db")
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("SELECT count(*) FROM counters").fetchone()[0] == count
    check.close()


def test_connections_opened_at_once_on_a_new_file_all_get_wal(tmp_path: Path) -> None:
    """A node opens several connections to a new file at start (migration, writer,
    checkpointer); SQLite answers all but one switch to WAL with "database is locked" at
    once. Before the retry, 12 rounds in 100 of this failed."""

    def open_one(path: str, writer: bool, barrier: threading.Barrier, out: list[object]) -> None:
        barrier.wait()
        try:
            conn = sqlite_connection(path, writer=writer)
            out.append(conn.execute("PRAGMA journal_mode").fetchone()[0])
            conn.close()
        except Exception as exc:
            out.append(exc)

    for round_ in range(50):
        path, barrier = str(tmp_path / f"new{round_}.db"), threading.Barrier(6)
        out: list[object] = []
        threads = [threading.Thread(target=open_one, args=(path, i % 2 == 0, barrier, out)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == ["wal"] * 6, (round_, out)


def test_bulk_inserts_run_in_statements_of_at_most_64_rows_with_a_pause_after_each(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    conn.execute("CREATE TABLE inbox (user_id INTEGER, seq INTEGER, message_id INTEGER, PRIMARY KEY (user_id, seq))")
    statements: list[int] = []
    conn.set_trace_callback(lambda sql: statements.append(sql.count("(") - 1) if sql.startswith("INSERT") else None)
    bulk = Bulk(insert(inbox).values(user_id=bindparam("u"), seq=bindparam("s"), message_id=bindparam("m")),
                sqlite.dialect(), ("u", "s", "m"))
    rows = [(1 + i % 7, i, 1000 + i) for i in range(201)]
    pauses: list[float] = []
    bulk.run(conn.cursor(), rows, pauses.append)
    assert statements == [64, 64, 64, 8, 1]  # rows per statement; the last row alone
    assert len(pauses) == len(statements) and all(0 <= p < 5 for p in pauses)
    assert conn.execute("SELECT user_id, seq, message_id FROM inbox ORDER BY seq").fetchall() == rows
    assert max(statements) == SQLITE_MAX_ROWS
    conn.close()
