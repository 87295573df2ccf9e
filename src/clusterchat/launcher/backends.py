"""Throw-away PostgreSQL, MariaDB and Redis servers: for the tests and ``clusterchat cluster``.

Every server started here:

* listens on 127.0.0.1 on a free port (never the default port of the shared system instance),
* keeps its data, sockets and log in the folder it is given,
* is stopped (graceful signal, then SIGKILL after a timeout) and its folder deleted when the
  context manager exits,
* dies with the process that started it (``PR_SET_PDEATHSIG``) if that process is killed
  before it can clean up (see :mod:`clusterchat.launcher.processes`).

These are plain context managers without any pytest dependency::

    with start_postgres(Path("/tmp/pg")) as pg:
        url = pg.create_database("chat")  # postgresql://postgres@127.0.0.1:PORT/chat

A missing server binary raises :class:`BackendUnavailable` (a ``RuntimeError``) naming the
Debian package to install; ``scripts/test.sh`` installs them all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from clusterchat.launcher.processes import (
    HOST,
    BackendUnavailable,
    ServerProcess,
    ServerStartError,
    Supervised,
    clean_env,
    free_port,
    is_root,
    launch,
    remove_tree,
    require,
    run_command,
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

_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin for the file name


def _short_dir(preferred: Path, name_len: int, created: list[Path]) -> Path:
    """``preferred`` if a socket of ``name_len`` characters fits in it, else a short temp dir."""
    if len(str(preferred)) + 1 + name_len <= _SOCKET_PATH_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    short = Path(tempfile.mkdtemp(prefix="cc-sock-", dir="/tmp"))
    created.append(short)
    return short


def _check_db_name(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: use 1-63 characters of [a-z0-9_], not starting with a digit")
    return name


class _RunningServer(Supervised):
    """What every database server here offers its supervisor: whether it runs, and a restart in place."""

    name = "server"
    port: int

    def __init__(self, process: ServerProcess | None, ready: Callable[[int], bool] | None) -> None:
        self._process = process
        self._ready = ready

    def restart(self) -> None:
        """Run the server again on the same port and data (after a crash), and wait until it is ready."""
        if self._process is None or self._ready is None:
            raise RuntimeError(f"{self.name} was not started here")
        self._process.restart(functools.partial(self._ready, self.port))


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bindir() -> Path:
    """Directory holding initdb/postgres: $CLUSTERCHAT_PG_BINDIR, newest Debian version, PATH."""
    override = os.environ.get("CLUSTERCHAT_PG_BINDIR")
    if override:
        return Path(override)

    def version(path: Path) -> tuple[int, ...]:
        digits = re.findall(r"\d+", path.parent.parent.name)
        return tuple(int(d) for d in digits)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if debian:
        return debian[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise BackendUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found: install the Debian package "
        "'postgresql' (`apt-get install -y postgresql`), or run scripts/test.sh, which installs "
        "every test dependency. Set CLUSTERCHAT_PG_BINDIR to use binaries elsewhere."
    )


class PgServer(_RunningServer):
    """A running throw-away PostgreSQL server (superuser ``postgres``, trust authentication)."""

    name = "PostgreSQL"
    user = "postgres"

    def __init__(self, *, port: int, bindir: Path, data_dir: Path, socket_dir: Path, log_path: Path,
                 process: ServerProcess | None = None, ready: Callable[[int], bool] | None = None) -> None:
        super().__init__(process, ready)
        self.host = HOST
        self.port = port
        self.bindir = bindir
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.log_path = log_path

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with ``psql`` over TCP as the superuser; return its (unaligned) output."""
        argv = [
            str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database,
            "-c", sql,
        ]  # fmt: skip
        return run_command(argv, "psql")

    def create_database(self, name: str) -> str:
        """Create an empty UTF-8 database and return ``postgresql://postgres@127.0.0.1:PORT/NAME``."""
        self.psql(f"CREATE DATABASE \"{_check_db_name(name)}\" TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating any sessions still connected to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{_check_db_name(name)}" WITH (FORCE)')

    def __repr__(self) -> str:
        return f"<PgServer {self.host}:{self.port} data={self.data_dir}>"


def durable_shared_buffers_mb() -> int:
    """PostgreSQL's buffer cache for a server of chat data: a quarter of the machine's memory,
    between PostgreSQL's own default (128 MB) and 1 GB. With the default, a minute of `bench
    direct` (1,000 users) left 68-90% of the buffers dirty (10% with 1 GB), and closed-loop
    throughput fell from run to run as the tables grew (docs/design.md, "On PostgreSQL: four
    round trips")."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 128
    return max(128, min(1024, memory // 4 // 2**20))


@contextlib.contextmanager
def start_postgres(base_dir: Path, *, durable: bool = False) -> Iterator[PgServer]:
    """initdb + start a PostgreSQL server in ``base_dir`` on a free port.

    Tests run it with fsync off (throw-away data); ``durable=True`` keeps PostgreSQL's
    defaults but a bigger buffer cache and WAL segments not zero-filled, for `clusterchat
    cluster` and for benchmarks whose figures must include the cost of durable commits.

    As root, initdb and postgres run as the ``postgres`` OS user (postgres refuses to run as
    root). If that user cannot reach ``base_dir`` (pytest's temp root is mode 0700), the data
    directory goes to a private ``/tmp/clusterchat-pg-*`` folder instead; logs stay in
    ``base_dir``. Everything is deleted on exit.
    """
    bindir = _postgres_bindir()
    for tool in ("initdb", "postgres", "pg_isready", "psql"):
        if not (bindir / tool).is_file():
            raise BackendUnavailable(
                f"{bindir / tool} not found: install the Debian packages 'postgresql' and "
                "'postgresql-client' (or run scripts/test.sh)."
            )
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    run_as = "postgres" if is_root() else None
    extra_dirs: list[Path] = []
    proc: ServerProcess | None = None
    try:
        work = base_dir / "pg"
        work.mkdir()
        if run_as is not None:
            shutil.chown(work, run_as, run_as)
            probe = subprocess.run(
                ["test", "-w", str(work), "-a", "-x", str(work)],
                user=run_as, group=run_as, extra_groups=[], check=False, env=clean_env(),
            )  # fmt: skip
            if probe.returncode != 0:
                work = Path(tempfile.mkdtemp(prefix="clusterchat-pg-", dir="/tmp"))
                extra_dirs.append(work)
                shutil.chown(work, run_as, run_as)
        data_dir = work / "data"
        socket_dir = _short_dir(work / "run", len(".s.PGSQL.65535.lock"), extra_dirs)
        if run_as is not None:
            shutil.chown(socket_dir, run_as, run_as)
        socket_dir.chmod(0o700)

        run_command(
            [
                str(bindir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            "initdb", user=run_as, cwd=work, log_path=base_dir / "initdb.log",
        )  # fmt: skip

        def argv(port: int) -> list[str]:
            return [
                str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port),
                "-c", f"listen_addresses={HOST}",
                "-c", f"unix_socket_directories={socket_dir}",
                "-c", "max_connections=200",
                "-c", "logging_collector=off",
                # Durable: PostgreSQL's defaults but for shared_buffers (see durable_shared_buffers_mb)
                # and wal_init_zero: a new 16 MB WAL segment is not zero-filled and fsynced by the
                # committing backend (every ~3 s at 5,000 msgs/s until checkpoints recycle
                # segments, a stall of ~15 ms each; docs/design.md). Commits still fsync.
                # Throw-away data: trade durability for speed.
                *(["-c", f"shared_buffers={durable_shared_buffers_mb()}MB", "-c", "wal_init_zero=off"] if durable else
                  ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
            ]  # fmt: skip

        def ready(port: int) -> bool:
            probe = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "2",
                 "-U", "postgres", "-d", "postgres"],
                stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(), check=False,
            )  # fmt: skip
            return probe.returncode == 0

        proc, port = launch(
            "PostgreSQL",
            argv,
            ready,
            base_dir / "postgres.log",
            # SIGINT = "fast" shutdown: disconnects clients instead of waiting for them.
            stop_signal=signal.SIGINT,
            # SIGQUIT = "immediate" shutdown, for when the test process died.
            death_signal=signal.SIGQUIT,
            cwd=work,
            user=run_as,
        )
        yield PgServer(
            port=port,
            bindir=bindir,
            data_dir=data_dir,
            socket_dir=socket_dir,
            log_path=base_dir / "postgres.log",
            process=proc,
            ready=ready,
        )
    finally:
        if proc is not None:
            proc.stop()
        for extra in extra_dirs:
            remove_tree(extra)
        remove_tree(base_dir)


# --------------------------------------------------------------------------- MariaDB


class MariaDbServer(_RunningServer):
    """A running throw-away MariaDB server; ``root`` has an empty password (socket and TCP)."""

    name = "MariaDB"
    user = "root"

    def __init__(self, *, port: int, client: str, data_dir: Path, socket_path: Path, log_path: Path,
                 process: ServerProcess | None = None, ready: Callable[[int], bool] | None = None) -> None:
        super().__init__(process, ready)
        self.host = HOST
        self.port = port
        self.client = client
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.log_path = log_path

    def url(self, database: str) -> str:
        return f"mysql://{self.user}@{self.host}:{self.port}/{database}"

    def sql(self, sql: str) -> str:
        """Run SQL with the ``mariadb`` client over the unix socket as root; return its output."""
        argv = [
            self.client, "--no-defaults", "--batch", "--skip-column-names",
            f"--socket={self.socket_path}", "--user=root", "-e", sql,
        ]  # fmt: skip
        return run_command(argv, "mariadb client")

    def create_database(self, name: str) -> str:
        """Create an empty utf8mb4/utf8mb4_bin database; return ``mysql://root@127.0.0.1:PORT/NAME``."""
        self.sql(f"CREATE DATABASE `{_check_db_name(name)}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database (gives up after 10 s if open transactions still lock its tables)."""
        self.sql(f"SET SESSION lock_wait_timeout = 10; DROP DATABASE IF EXISTS `{_check_db_name(name)}`")

    def __repr__(self) -> str:
        return f"<MariaDbServer {self.host}:{self.port} data={self.data_dir}>"


@contextlib.contextmanager
def start_mariadb(base_dir: Path) -> Iterator[MariaDbServer]:
    """mariadb-install-db into ``base_dir``, then run mariadbd on a free port; delete on exit."""
    mariadbd = require("mariadbd", "mariadb-server", candidates=[Path("/usr/sbin/mariadbd")])
    install_db = require("mariadb-install-db", "mariadb-server")
    client = require("mariadb", "mariadb-client")
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    extra_dirs: list[Path] = []
    proc: ServerProcess | None = None
    # mariadbd resolves "--user=root" itself; as a normal user it runs as that user.
    user_opt = ["--user=root"] if is_root() else []
    server_opts = [
        "--skip-log-bin",
        "--skip-name-resolve",
        "--innodb-buffer-pool-size=32M",
        "--innodb-log-file-size=16M",
        "--innodb-flush-log-at-trx-commit=2",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_bin",
    ]
    try:
        data_dir = base_dir / "data"
        tmp_dir = base_dir / "tmp"
        tmp_dir.mkdir()
        socket_path = _short_dir(base_dir, len("mariadb.sock"), extra_dirs) / "mariadb.sock"
        run_command(
            [
                install_db, "--no-defaults", f"--datadir={data_dir}", *user_opt,
                "--auth-root-authentication-method=normal", "--skip-test-db",
                f"--tmpdir={tmp_dir}", *server_opts,
            ],
            "mariadb-install-db", cwd=base_dir, log_path=base_dir / "install-db.log",
        )  # fmt: skip

        def argv(port: int) -> list[str]:
            return [
                mariadbd, "--no-defaults", f"--datadir={data_dir}", *user_opt,
                f"--port={port}", f"--bind-address={HOST}", "--skip-networking=0",
                f"--socket={socket_path}", f"--pid-file={base_dir / 'mariadbd.pid'}",
                f"--tmpdir={tmp_dir}", "--max-connections=300", *server_opts,
            ]  # fmt: skip

        def ready(port: int) -> bool:
            # Over TCP as root with an empty password: exactly what the tests will do.
            probe = subprocess.run(
                [client, "--no-defaults", "--protocol=TCP", f"--host={HOST}", f"--port={port}",
                 "--user=root", "--connect-timeout=2", "-e", "SELECT 1"],
                stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(), check=False,
            )  # fmt: skip
            return probe.returncode == 0

        proc, port = launch("MariaDB", argv, ready, base_dir / "mariadbd.log", cwd=base_dir)
        yield MariaDbServer(
            port=port,
            client=client,
            data_dir=data_dir,
            socket_path=socket_path,
            log_path=base_dir / "mariadbd.log",
            process=proc,
            ready=ready,
        )
    finally:
        if proc is not None:
            proc.stop()
        for extra in extra_dirs:
            remove_tree(extra)
        remove_tree(base_dir)


# --------------------------------------------------------------------------- Redis


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(Supervised):
    """A throw-away Redis server without persistence that can be stopped and restarted.

    ``stop()``/``start()`` keep the port (and thus :attr:`url`), so running nodes can be
    tested against a Redis outage. Data does not survive a restart.
    """

    name = "Redis"

    def __init__(self, *, binary: str, base_dir: Path) -> None:
        self.host = HOST
        self.binary = binary
        self.base_dir = base_dir
        self.log_path = base_dir / "redis.log"
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _argv(self, port: int) -> list[str]:
        return [
            self.binary, "--port", str(port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--dir", str(self.base_dir),
            "--daemonize", "no", "--logfile", "",
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server (on a free port the first time, then on the same port again)."""
        if self.running:
            return
        self._process, self.port = launch(
            "Redis",
            self._argv,
            _redis_pings,
            self.log_path,
            port=self.port or None,
            cwd=self.base_dir,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after a timeout); :meth:`start` brings it back."""
        if self._process is not None:
            proc, self._process = self._process, None
            proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


@contextlib.contextmanager
def start_redis(base_dir: Path) -> Iterator[RedisServer]:
    """Start redis-server (no persistence) on a free port in ``base_dir``; delete on exit."""
    binary = require("redis-server", "redis-server", candidates=[Path("/usr/bin/redis-server")])
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary=binary, base_dir=base_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        remove_tree(base_dir)
