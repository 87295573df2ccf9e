"""Throw-away PostgreSQL, MariaDB and Redis servers for integration tests.

Every server started here:

* listens on 127.0.0.1 on a free port (never the default port of the shared system instance),
* keeps its data, sockets and log in a temporary folder,
* is stopped (graceful signal, then SIGKILL after a timeout) and its folder deleted when the
  context manager exits,
* dies with the process that started it (``PR_SET_PDEATHSIG``) if that process is killed
  before it can clean up, so no stray servers survive a crashed or killed test run.

These are plain context managers without any pytest dependency::

    with start_postgres(Path("/tmp/pg")) as pg:
        url = pg.create_database("chat")  # postgresql://postgres@127.0.0.1:PORT/chat

A missing server binary raises :class:`BackendUnavailable` (a ``RuntimeError``) naming the
Debian package to install; ``scripts/test.sh`` installs them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

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

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
"""Seconds to wait for a server to accept connections."""
STOP_TIMEOUT = 30.0
"""Seconds to wait for a graceful shutdown before SIGKILL."""
COMMAND_TIMEOUT = 120.0
"""Seconds allowed for a helper command (initdb, psql, mariadb, ...)."""

_LOG_TAIL_LINES = 40
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = re.compile(r"address already in use|could not bind|can't start server", re.I)
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin for the file name

# Never let the helpers pick up a developer's or CI's ambient client configuration.
_SCRUBBED_ENV_PREFIXES = ("PG", "MYSQL", "MARIADB", "REDIS")


class BackendUnavailable(RuntimeError):
    """A server binary needed by the tests is not installed."""


class ServerStartError(RuntimeError):
    """A server (or its initialisation command) failed or did not become ready in time."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    env.update(extra)
    return env


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<empty>"


def _require(binary: str, package: str, *, candidates: Sequence[Path] = ()) -> str:
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(binary)
    if found is None:
        raise BackendUnavailable(
            f"{binary!r} not found: install the Debian package {package!r} "
            f"(`apt-get install -y {package}`), or simply run scripts/test.sh, "
            f"which installs every test dependency."
        )
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


def _short_dir(preferred: Path, name_len: int, created: list[Path]) -> Path:
    """``preferred`` if a socket of ``name_len`` characters fits in it, else a short temp dir."""
    if len(str(preferred)) + 1 + name_len <= _SOCKET_PATH_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    short = Path(tempfile.mkdtemp(prefix="cc-sock-", dir="/tmp"))
    created.append(short)
    return short


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- parent-death signal: servers must not outlive a killed test process -------------

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl


def _death_signal_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive ``sig`` when this process dies.

    The kernel delivers the signal when the *thread* that forked the child exits, so this is
    only armed when called from the main thread (which lives as long as the process).
    """
    prctl = _prctl
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child, after the uid/gid switch
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent already died before prctl took effect
            os.kill(os.getpid(), int(sig))

    return preexec


# --------------------------------------------------------------------------- processes


class _ServerProcess:
    """One long-running server process with its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        stop_signal: signal.Signals,
        death_signal: signal.Signals,
        cwd: Path,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user, group=user, extra_groups=[])
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=_clean_env(),
                start_new_session=True,  # own process group: Ctrl-C does not hit it, killpg does
                preexec_fn=_death_signal_preexec(death_signal),
                **kwargs,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Poll ``check`` until it returns True; raise with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} before accepting "
                    f"connections.\ncommand: {shlex.join(self.argv)}\n"
                    f"--- last lines of {self.log_path} ---\n{_log_tail(self.log_path)}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} did not accept connections within {timeout:.0f} s.\n"
                    f"command: {shlex.join(self.argv)}\n"
                    f"--- last lines of {self.log_path} ---\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def port_was_taken(self) -> bool:
        return not self.running and bool(_ADDRESS_IN_USE.search(_log_tail(self.log_path)))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful stop signal, then SIGKILL to the whole process group after ``timeout``."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(self.stop_signal)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Kill the whole group (e.g. postgres backends too). The unreaped leader
                    # keeps the group id reserved, so this cannot hit an unrelated process.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            self._log.close()


def _launch(
    name: str,
    make_argv: Callable[[int], Sequence[str]],
    check: Callable[[int], bool],
    log_path: Path,
    *,
    port: int | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
    death_signal: signal.Signals = signal.SIGTERM,
    cwd: Path,
    user: str | None = None,
) -> tuple[_ServerProcess, int]:
    """Start a server and wait until ``check(port)`` succeeds.

    With ``port=None`` a free port is picked, and a fresh one is tried (a few times) if another
    process grabbed it between :func:`free_port` and the server's bind.
    """
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        proc = _ServerProcess(
            name,
            make_argv(chosen),
            log_path,
            stop_signal=stop_signal,
            death_signal=death_signal,
            cwd=cwd,
            user=user,
        )
        try:
            proc.wait_ready(functools.partial(check, chosen))
        except ServerStartError:
            taken = proc.port_was_taken()
            proc.stop()
            if taken and attempt < attempts:
                continue
            raise
        except BaseException:
            proc.stop()
            raise
        return proc, chosen
    raise AssertionError("unreachable")  # pragma: no cover


def _run(
    argv: Sequence[str],
    what: str,
    *,
    user: str | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    """Run a helper command; raise :class:`ServerStartError` with its output if it fails."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user, group=user, extra_groups=[])
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=_clean_env(),
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError(f"{what} timed out after {timeout:.0f} s: {shlex.join(argv)}") from exc
    output = (result.stdout or "") + (result.stderr or "")
    if log_path is not None:
        log_path.write_text(output)
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
        raise ServerStartError(f"{what} failed with exit code {result.returncode}: {shlex.join(argv)}\n{tail}")
    stdout: str = result.stdout
    return stdout


def _check_db_name(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: use 1-63 characters of [a-z0-9_], not starting with a digit")
    return name


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


class PgServer:
    """A running throw-away PostgreSQL server (superuser ``postgres``, trust authentication)."""

    user = "postgres"

    def __init__(self, *, port: int, bindir: Path, data_dir: Path, socket_dir: Path, log_path: Path) -> None:
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
        return _run(argv, "psql")

    def create_database(self, name: str) -> str:
        """Create an empty UTF-8 database and return ``postgresql://postgres@127.0.0.1:PORT/NAME``."""
        self.psql(f"CREATE DATABASE \"{_check_db_name(name)}\" TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating any sessions still connected to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{_check_db_name(name)}" WITH (FORCE)')

    def __repr__(self) -> str:
        return f"<PgServer {self.host}:{self.port} data={self.data_dir}>"


@contextlib.contextmanager
def start_postgres(base_dir: Path, *, durable: bool = False) -> Iterator[PgServer]:
    """initdb + start a PostgreSQL server in ``base_dir`` on a free port.

    Tests run it with fsync off (throw-away data); ``durable=True`` keeps PostgreSQL's
    defaults, for benchmarks whose figures must include the cost of durable commits.

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
    run_as = "postgres" if _is_root() else None
    extra_dirs: list[Path] = []
    proc: _ServerProcess | None = None
    try:
        work = base_dir / "pg"
        work.mkdir()
        if run_as is not None:
            shutil.chown(work, run_as, run_as)
            probe = subprocess.run(
                ["test", "-w", str(work), "-a", "-x", str(work)],
                user=run_as, group=run_as, extra_groups=[], check=False, env=_clean_env(),
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

        _run(
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
                # Throw-away data: trade durability for speed.
                *([] if durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                      "-c", "full_page_writes=off"]),
            ]  # fmt: skip

        def ready(port: int) -> bool:
            probe = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "2",
                 "-U", "postgres", "-d", "postgres"],
                stdin=subprocess.DEVNULL, capture_output=True, env=_clean_env(), check=False,
            )  # fmt: skip
            return probe.returncode == 0

        proc, port = _launch(
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
        )
    finally:
        if proc is not None:
            proc.stop()
        for extra in extra_dirs:
            _remove_tree(extra)
        _remove_tree(base_dir)


# --------------------------------------------------------------------------- MariaDB


class MariaDbServer:
    """A running throw-away MariaDB server; ``root`` has an empty password (socket and TCP)."""

    user = "root"

    def __init__(self, *, port: int, client: str, data_dir: Path, socket_path: Path, log_path: Path) -> None:
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
        return _run(argv, "mariadb client")

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
    mariadbd = _require("mariadbd", "mariadb-server", candidates=[Path("/usr/sbin/mariadbd")])
    install_db = _require("mariadb-install-db", "mariadb-server")
    client = _require("mariadb", "mariadb-client")
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    extra_dirs: list[Path] = []
    proc: _ServerProcess | None = None
    # mariadbd resolves "--user=root" itself; as a normal user it runs as that user.
    user_opt = ["--user=root"] if _is_root() else []
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
        _run(
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
                stdin=subprocess.DEVNULL, capture_output=True, env=_clean_env(), check=False,
            )  # fmt: skip
            return probe.returncode == 0

        proc, port = _launch("MariaDB", argv, ready, base_dir / "mariadbd.log", cwd=base_dir)
        yield MariaDbServer(
            port=port,
            client=client,
            data_dir=data_dir,
            socket_path=socket_path,
            log_path=base_dir / "mariadbd.log",
        )
    finally:
        if proc is not None:
            proc.stop()
        for extra in extra_dirs:
            _remove_tree(extra)
        _remove_tree(base_dir)


# --------------------------------------------------------------------------- Redis


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throw-away Redis server without persistence that can be stopped and restarted.

    ``stop()``/``start()`` keep the port (and thus :attr:`url`), so running nodes can be
    tested against a Redis outage. Data does not survive a restart.
    """

    def __init__(self, *, binary: str, base_dir: Path) -> None:
        self.host = HOST
        self.binary = binary
        self.base_dir = base_dir
        self.log_path = base_dir / "redis.log"
        self.port = 0
        self._proc: _ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

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
        self._proc, self.port = _launch(
            "Redis",
            self._argv,
            _redis_pings,
            self.log_path,
            port=self.port or None,
            cwd=self.base_dir,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after a timeout); :meth:`start` brings it back."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
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
    binary = _require("redis-server", "redis-server", candidates=[Path("/usr/bin/redis-server")])
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary=binary, base_dir=base_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        _remove_tree(base_dir)
