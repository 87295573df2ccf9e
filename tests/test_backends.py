"""The real database/Redis fixtures work: servers start, URLs connect, databases are isolated."""

from __future__ import annotations

import re
import socket
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncmy
import asyncpg
import pytest
import redis.asyncio as aioredis

from support.backends import MariaDbServer, PgServer, RedisServer, free_port

Row = tuple[Any, ...]
MakeDbUrl = Callable[[str], str]


async def run_sql(url: str, statements: Sequence[str]) -> list[Row]:
    """Execute ``statements`` in order on the database at ``url``; return the last one's rows."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        conn = sqlite3.connect(parts.path)
        try:
            rows: list[Row] = []
            for statement in statements:
                rows = [tuple(r) for r in conn.execute(statement).fetchall()]
            conn.commit()
            return rows
        finally:
            conn.close()
    if parts.scheme == "postgresql":
        pg = await asyncpg.connect(url)
        try:
            records: list[Any] = []
            for statement in statements:
                records = await pg.fetch(statement)
            return [tuple(r) for r in records]
        finally:
            await pg.close()
    if parts.scheme == "mysql":
        my = await asyncmy.connect(
            host=parts.hostname,
            port=parts.port,
            user=parts.username,
            password=parts.password or "",
            database=parts.path.lstrip("/"),
            autocommit=True,
        )
        try:
            async with my.cursor() as cur:
                for statement in statements:
                    await cur.execute(statement)
                return [tuple(r) for r in await cur.fetchall()]
        finally:
            my.close()
    raise AssertionError(f"unexpected URL scheme in {url}")


async def table_names(url: str) -> set[str]:
    scheme = urlsplit(url).scheme
    query = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
        "postgresql": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        "mysql": "SHOW TABLES",
    }[scheme]
    return {row[0] for row in await run_sql(url, [query])}


def port_is_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- servers


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert port not in (5432, 3306, 6379)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_postgres_server(pg_server: PgServer) -> None:
    assert pg_server.port != 5432
    url = pg_server.create_database("t_backend_smoke_pg")
    assert url == f"postgresql://postgres@127.0.0.1:{pg_server.port}/t_backend_smoke_pg"
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
        assert await conn.fetchval("SELECT current_database()") == "t_backend_smoke_pg"
    finally:
        await conn.close()
    pg_server.drop_database("t_backend_smoke_pg")


async def test_mariadb_server(mariadb_server: MariaDbServer) -> None:
    assert mariadb_server.port != 3306
    url = mariadb_server.create_database("t_backend_smoke_my")
    assert url == f"mysql://root@127.0.0.1:{mariadb_server.port}/t_backend_smoke_my"
    rows = await run_sql(
        url,
        [
            "SELECT @@character_set_database, @@collation_database, DATABASE(), 1",
        ],
    )
    assert rows == [("utf8mb4", "utf8mb4_bin", "t_backend_smoke_my", 1)]
    mariadb_server.drop_database("t_backend_smoke_my")


async def test_redis_server(redis_server: RedisServer) -> None:
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", redis_server.url)
    assert redis_server.port != 6379
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
        key = f"test:{uuid.uuid4().hex}"
        await client.set(key, "value")
        assert await client.get(key) == b"value"
    finally:
        await client.aclose()


async def test_redis_restart_keeps_url(redis_server: RedisServer) -> None:
    url, port = redis_server.url, redis_server.port
    key = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(url)
    try:
        await client.set(key, "before restart")
    finally:
        await client.aclose()

    redis_server.stop()
    try:
        assert not redis_server.running
        assert not port_is_open(port)
    finally:
        redis_server.start()

    assert redis_server.running
    assert (redis_server.url, redis_server.port) == (url, port)
    client = aioredis.from_url(url)
    try:
        assert await client.ping() is True
        assert await client.get(key) is None  # no persistence: data is gone after a restart
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- db_url


_URL_FORMS = {
    "sqlite": r"sqlite:////.+/chat\.db",
    "mariadb": r"mysql://root@127\.0\.0\.1:\d+/t_\w+",
    "postgresql": r"postgresql://postgres@127\.0\.0\.1:\d+/t_\w+",
}


async def test_db_url_is_fresh_and_usable(db_backend: str, db_url: str) -> None:
    assert re.fullmatch(_URL_FORMS[db_backend], db_url), db_url
    assert await table_names(db_url) == set()
    rows = await run_sql(
        db_url,
        [
            "CREATE TABLE greeting (id INTEGER PRIMARY KEY, body VARCHAR(100) NOT NULL)",
            "INSERT INTO greeting (id, body) VALUES (1, 'héllo wörld ✓')",
            "SELECT id, body FROM greeting",
        ],
    )
    assert rows == [(1, "héllo wörld ✓")]
    assert await table_names(db_url) == {"greeting"}


async def test_db_urls_are_separate_databases(db_backend: str, db_url: str, make_db_url: MakeDbUrl) -> None:
    other_url = make_db_url(db_backend)
    assert other_url != db_url
    await run_sql(db_url, ["CREATE TABLE only_in_first (id INTEGER PRIMARY KEY)"])
    assert await table_names(db_url) == {"only_in_first"}
    assert await table_names(other_url) == set()


def test_unknown_backend_is_rejected(make_db_url: MakeDbUrl) -> None:
    with pytest.raises(ValueError, match="unknown database backend"):
        make_db_url("oracle")
