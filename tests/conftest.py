"""Shared pytest fixtures.

Real database servers (see ``support/backends.py``) are session-scoped and started lazily: a
server only starts when the first test that needs it runs, and is stopped and deleted at the
end of the session.

* ``pg_server`` / ``mariadb_server`` / ``redis_server``: the running servers.
* ``make_db_url(backend)``: a fresh, empty database URL for ``"sqlite"``, ``"mariadb"`` or
  ``"postgresql"``; call it several times for several databases.
* ``db_backend`` + ``db_url``: a test using ``db_url`` runs once per backend. To restrict a
  test, override the parameter:
  ``@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)``.
* ``make_nginx(*nodes)``: nginx on free ports in a temporary folder in front of running nodes
  (the configuration ``clusterchat cluster`` generates); stopped after the test.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterchat.launcher.nginx import NginxServer, NodeAddress, start_nginx
from support.backends import (
    MariaDbServer,
    PgServer,
    RedisServer,
    start_mariadb,
    start_postgres,
    start_redis,
)
from support.node import NodeProcess
from support.users import Chat

DB_BACKENDS = ("sqlite", "mariadb", "postgresql")

MakeDbUrl = Callable[[str], str]
"""``make_db_url(backend) -> url`` (see the ``make_db_url`` fixture)."""
MakeNginx = Callable[..., NginxServer]
"""``make_nginx(*nodes) -> NginxServer`` (see the ``make_nginx`` fixture)."""

_SERVER_FIXTURES = {"mariadb": "mariadb_server", "postgresql": "pg_server"}


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    with start_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDbServer]:
    with start_mariadb(tmp_path_factory.mktemp("mariadb")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Session-wide Redis. Tests that ``stop()`` it must ``start()`` it again before returning."""
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


# --------------------------------------------------------------------------- databases


def _database_name(test_name: str) -> str:
    """A unique, valid, recognisable database name, e.g. ``t_test_send_mariadb_1a2b3c4d``."""
    stem = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeDbUrl]:
    """Factory for fresh, empty database URLs; databases are dropped after the test.

    ``sqlite`` -> ``sqlite:///<tmp_path>/chat.db`` (then ``chat_2.db``, ...),
    ``mariadb`` -> ``mysql://root@127.0.0.1:PORT/NAME`` (utf8mb4, utf8mb4_bin),
    ``postgresql`` -> ``postgresql://postgres@127.0.0.1:PORT/NAME``.
    """
    created: list[tuple[PgServer | MariaDbServer, str]] = []
    sqlite_files = itertools.count(1)

    def make(backend: str) -> str:
        if backend == "sqlite":
            n = next(sqlite_files)
            return f"sqlite:///{tmp_path / ('chat.db' if n == 1 else f'chat_{n}.db')}"
        if backend not in _SERVER_FIXTURES:
            raise ValueError(f"unknown database backend {backend!r}; expected one of {DB_BACKENDS}")
        server: PgServer | MariaDbServer = request.getfixturevalue(_SERVER_FIXTURES[backend])
        name = _database_name(request.node.name)
        url = server.create_database(name)
        created.append((server, name))
        return url

    yield make

    for server, name in created:
        try:
            server.drop_database(name)
        except Exception as exc:  # cleanup only: the whole server is deleted at session end
            warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)


@pytest.fixture(params=DB_BACKENDS, ids=DB_BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def db_url(db_backend: str, make_db_url: MakeDbUrl) -> str:
    """A fresh, empty database URL for the current ``db_backend``."""
    return make_db_url(db_backend)


# --------------------------------------------------------------------------- nodes


@pytest.fixture
def start_node(db_url: str, tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``start_node(*flags)``: a running node on this test's database; killed after the test."""
    nodes: list[NodeProcess] = []

    def start(*flags: str) -> NodeProcess:
        node = NodeProcess(db_url, tmp_path / f"node{len(nodes)}", *flags).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()


@pytest.fixture
def node(start_node: Callable[..., NodeProcess]) -> NodeProcess:
    """A node with default flags (rate limit off) on this test's database, per backend."""
    return start_node("--rate-limit", "0")


@pytest.fixture
async def chat(node: NodeProcess) -> AsyncIterator[Chat]:
    """Users on `node` (see support/users.py); every connection is closed after the test."""
    async with Chat(node) as c:
        yield c


# --------------------------------------------------------------------------- nginx


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[MakeNginx]:
    """``make_nginx(*nodes, **options)``: a running nginx on free ports in front of ``nodes`` (NodeProcess);
    ``options`` go to ``start_nginx`` (e.g. ``proxy_timeout="1s"``)."""
    with contextlib.ExitStack() as stack:
        count = itertools.count(1)

        def make(*nodes: NodeProcess, **options: Any) -> NginxServer:
            addresses = [NodeAddress(node.host, node.port, node.ws_port) for node in nodes]
            return stack.enter_context(start_nginx(tmp_path / f"nginx{next(count)}", addresses, **options))

        yield make
