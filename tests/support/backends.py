"""Throw-away PostgreSQL, MariaDB and Redis servers for the tests.

The code lives in the package (:mod:`clusterchat.launcher.backends`), shared with
``clusterchat cluster``; this module keeps the tests' import path.
"""

from __future__ import annotations

from clusterchat.launcher.backends import (
    BackendUnavailable,
    MariaDbServer,
    PgServer,
    RedisServer,
    ServerStartError,
    free_port,
    start_mariadb,
    start_postgres,
    start_redis,
)

__all__ = [
    "BackendUnavailable",
    "MariaDbServer",
    "PgServer",
    "RedisServer",
    "ServerStartError",
    "free_port",
    "start_mariadb",
    "start_postgres",
    "start_redis",
]
