"""Opening the database: URL translation, engines per dialect, and schema upgrades.

Users give SQLAlchemy URLs without a driver (`sqlite:///x.db`, `mysql://…`,
`postgresql://…`); we pick the asyncio driver. SQLite gets one writer connection
that begins transactions with BEGIN IMMEDIATE (so writers queue instead of failing
with "database is locked") and a separate pool of readers; WAL lets them overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from clusterchat.errors import register_unavailable
from clusterchat.storage.wal import WalCheckpointer
from clusterchat.storage.write_thread import Transaction, WriteThread

log = logging.getLogger(__name__)
T = TypeVar("T")

# A lost or refused database connection is "retry later", not a bug.
register_unavailable(OperationalError, InterfaceError, DisconnectionError, PoolTimeout, OSError)

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file keeps once it starts over
WAL_SWITCH_TRIES = 40  # 50 ms apart: two seconds for another connection to finish switching a new file
MIGRATIONS = Path(__file__).parent / "migrations"
POOL_RECYCLE = 1800  # seconds a server connection is used before a new one replaces it (pools and held)
DRIVERS = {"sqlite": "sqlite+aiosqlite", "mysql": "mysql+asyncmy", "mariadb": "mysql+asyncmy",
           "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}  # fmt: skip


class DatabaseUrlError(ValueError):
    pass


def async_url(url: str) -> URL:
    """`mysql://u:p@h/db` as `mysql+asyncmy://u:p@h/db`, and so on; drivers given are kept."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseUrlError(f"not a database URL: {redact(url)}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in DRIVERS:
        raise DatabaseUrlError(f"unsupported database {backend!r}: use sqlite, mysql or postgresql")
    if not driver:
        parsed = parsed.set(drivername=DRIVERS[backend])
    if parsed.drivername.startswith("mysql") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def redact(url: str) -> str:
    """A URL fit for logs: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


class Database:
    """The engines of one database. `writer` for transactions that write, `reader` for reads."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.dialect = self.url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            connect_args = {"timeout": 30}
            self.writer = create_async_engine(
                self.url, pool_size=1, max_overflow=0, connect_args=connect_args
            )
            self.reader = create_async_engine(
                self.url, pool_size=pool_size, max_overflow=0, connect_args=connect_args
            )
            event.listen(self.writer.sync_engine, "connect", _sqlite_writer_connect)
            event.listen(self.writer.sync_engine, "begin", _sqlite_begin_immediate)
            event.listen(self.reader.sync_engine, "connect", _sqlite_reader_connect)
            # Checkpoints run in a thread of their own, never inside a COMMIT (see wal.py), and
            # the message writer's transactions in another (see write_thread.py).
            checkpointer = None
            self.sqlite_file: str | None = None
            if database and database != ":memory:":
                path = self.sqlite_file = str(Path(database).expanduser())
                checkpointer = WalCheckpointer(lambda: sqlite_connection(path, writer=False))
            self._checkpointer: WalCheckpointer | None = checkpointer
            self.write_thread: WriteThread | None = WriteThread(
                lambda: sqlite_connection(database or ":memory:", writer=True), checkpointer)
        else:
            kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size,
                                      "pool_pre_ping": True, "pool_recycle": POOL_RECYCLE}
            self.writer = create_async_engine(self.url, **kwargs)
            self.reader = self.writer
            # The message writer's own connection (one batch at a time), without the pool's
            # ping: on asyncpg that ping is three round trips (BEGIN, ";", ROLLBACK) per batch.
            # It is held between batches; one found dead during a batch is replaced and the
            # batch run again (see _held_transaction).
            self._batches = create_async_engine(self.url, pool_size=1, max_overflow=0,
                                                pool_recycle=POOL_RECYCLE)
            self._checkpointer = None
            self.write_thread = None
            self.sqlite_file = None
        self._batch_conn: AsyncConnection | None = None
        self._batch_conn_since = 0.0
        self._batch_conn_unsure = False  # a failed batch could not be rolled back on it

        # The message writer runs on the driver's own cursor, so its errors arrive unwrapped:
        # the driver's "cannot reach the database" errors are `unavailable` too.
        dbapi: Any = sqlite3 if self.is_sqlite else self.writer.sync_engine.dialect.dbapi
        self.driver_errors: tuple[type[Exception], ...] = (dbapi.Error,)
        register_unavailable(*(e for e in (dbapi.OperationalError, getattr(dbapi, "InterfaceError", None)) if e))

    async def run_write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(cursor, *args)` in one write transaction, committed when it returns.

        `cursor` is the driver's own (DBAPI) cursor: `fn` runs precompiled SQL on it.
        """
        if self.write_thread is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()

            def job(transaction: Transaction) -> None:
                try:
                    result = transaction(fn, *args)
                except BaseException as exc:
                    loop.call_soon_threadsafe(_settle, future, None, exc)
                else:
                    loop.call_soon_threadsafe(_settle, future, result, None)

            self.write_thread.submit(job)
            return await future

        async def attempt(conn: AsyncConnection) -> tuple[T, Callable[[], Awaitable[None]]]:
            await conn.begin()
            return await conn.run_sync(_on_cursor, fn, *args), conn.commit

        return await self._held_transaction(attempt)

    async def run_batch(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """PostgreSQL: `await fn(connection, *args)` in one transaction, committed when it returns.

        `connection` is asyncpg's own, on the message writer's held connection: through
        SQLAlchemy's adapter (a pool checkout, a greenlet, the adapted cursor) the same four
        round trips cost the node ~2.4 times the CPU (docs/design.md, "On PostgreSQL").
        Errors are the adapter's DBAPI errors, as `run_write` raises them, and a batch whose
        connection was lost before COMMIT was sent runs again once on a new connection.
        """

        async def attempt(conn: AsyncConnection) -> tuple[T, Callable[[], Awaitable[None]]]:
            raw = await conn.get_raw_connection()
            adapted, driver = raw.dbapi_connection, cast(Any, raw.driver_connection)
            transaction = driver.transaction()
            try:
                await transaction.start()
                result = await fn(driver, *args)
            except Exception as exc:
                try:
                    await transaction.rollback()
                except Exception:
                    self._batch_conn_unsure = True  # never reuse it, whatever the error was
                raise _adapted_error(adapted, exc) from exc

            async def commit() -> None:
                try:
                    await transaction.commit()
                except Exception as exc:
                    raise _adapted_error(adapted, exc) from exc

            return result, commit

        return await self._held_transaction(attempt)

    async def _held_transaction(
            self, attempt: Callable[[AsyncConnection], Awaitable[tuple[T, Callable[[], Awaitable[None]]]]]) -> T:
        """`attempt` a transaction on the held connection, then its commit. Lost before COMMIT
        was sent: the server rolled it back, nothing was written, and no other batch ran in
        between, so it runs again, once, on a new connection. A failed COMMIT is never run
        again (it may have committed; a client's retry with the same cmid is deduplicated)."""
        retried = False
        while True:
            conn = await self._batch_connection()
            try:
                result, commit = await attempt(conn)
            except Exception as exc:
                await self._after_failed_batch(exc, retried)
                retried = True
                continue
            except BaseException:  # cancelled mid-batch: never reuse a connection in an unknown state
                await self._drop_batch_connection()
                raise
            try:
                await commit()
            except BaseException:
                await self._drop_batch_connection()
                raise
            return result

    async def _batch_connection(self) -> AsyncConnection:
        """The message writer's connection, held between batches (no checkout per batch)
        and given back to the pool to be recycled after `POOL_RECYCLE` seconds, as the pools do."""
        if self._batch_conn is not None and time.monotonic() - self._batch_conn_since > POOL_RECYCLE:
            await self._drop_batch_connection(invalidate=False)
        conn = self._batch_conn
        if conn is None:
            conn = self._batch_conn = await self._batches.connect()
            self._batch_conn_since = time.monotonic()
        return conn

    async def _drop_batch_connection(self, *, invalidate: bool = True) -> None:
        """Let go of the held connection: back to the pool, or (`invalidate`) closed for good."""
        conn, self._batch_conn = self._batch_conn, None
        self._batch_conn_unsure = False
        if conn is not None:
            if invalidate:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _after_failed_batch(self, exc: Exception, retried: bool) -> None:
        """A batch failed before COMMIT: raise `exc`, unless its connection was lost for the
        first time (then return: it runs again on a new connection)."""
        conn = self._batch_conn
        raw = await conn.get_raw_connection() if conn is not None and not conn.invalidated else None
        lost = self._batches.dialect.is_disconnect(cast(Any, exc), raw.dbapi_connection if raw else None, None)
        if lost or raw is None or self._batch_conn_unsure:
            await self._drop_batch_connection()
        else:
            with contextlib.suppress(Exception):
                await conn.rollback()  # type: ignore[union-attr]
        if retried or not lost:
            raise exc
        log.info("database connection lost before a write committed; retrying on a new one")

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration; safe to run from several nodes at once."""
        async with self.writer.connect() as conn:
            if self.dialect == "mysql":
                await conn.execute(text("SELECT GET_LOCK('clusterchat_migrate', 120)"))
            try:
                await conn.run_sync(self._upgrade)
                await conn.commit()
            finally:
                if self.dialect == "mysql":
                    await conn.execute(text("SELECT RELEASE_LOCK('clusterchat_migrate')"))

    def _upgrade(self, connection: Connection) -> None:
        if self.dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(7261544)"))
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async def close(self) -> None:
        if self.write_thread is not None:
            await asyncio.to_thread(self.write_thread.close)
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.close)
        await self.writer.dispose()
        if not self.is_sqlite:
            await self._drop_batch_connection(invalidate=False)
            await self._batches.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


def _sqlite_pragmas(dbapi_connection: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    _switch_to_wal(cursor)
    # FULL: a commit is on disk before it returns, so "ok" survives power loss too.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA cache_size=-65536")  # 64 MiB of page cache
    cursor.execute("PRAGMA mmap_size=268435456")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """WAL mode, which the file keeps. On a new file, connections opened at the same moment
    (the migration's, the writer's, the checkpointer's) race to switch it, and SQLite
    answers the loser "database is locked" at once, without waiting on busy_timeout
    (seen once in ~400 node starts of the test suite): try again for a while."""
    for attempt in range(WAL_SWITCH_TRIES):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == WAL_SWITCH_TRIES - 1:
                raise
            time.sleep(0.05)


def _sqlite_writer_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
    _sqlite_pragmas(dbapi_connection)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")  # WalCheckpointer's thread does it (see wal.py)
    cursor.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    cursor.close()


def sqlite_connection(path: str, *, writer: bool) -> sqlite3.Connection:
    """A stdlib connection for a thread of our own: autocommit unless we BEGIN, our pragmas."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    if writer:
        _sqlite_writer_connect(conn, None)
    else:
        _sqlite_pragmas(conn)
    return conn


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


def _sqlite_reader_connect(dbapi_connection: Any, _record: Any) -> None:
    _sqlite_pragmas(dbapi_connection)


def _adapted_error(adapted: Any, exc: Exception) -> Exception:
    """asyncpg's exception as SQLAlchemy's asyncpg adapter raises it (its DBAPI error classes)."""
    try:
        adapted._handle_exception(exc)
    except Exception as translated:
        return translated
    return exc


def _on_cursor(conn: Connection, fn: Callable[..., T], *args: Any) -> T:
    cursor = conn.connection.cursor()
    try:
        return fn(cursor, *args)
    finally:
        cursor.close()


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
