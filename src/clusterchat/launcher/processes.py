"""Server subprocesses owned by this process: free ports, start-until-ready, stop, restart.

Every server started through :func:`launch`:

* keeps its output in a log file whose last lines are quoted when it fails,
* runs in its own session (Ctrl-C in a terminal reaches only its owner, which stops it in order),
* dies with the process that started it (``PR_SET_PDEATHSIG``) if that process is killed
  before it can clean up, so no stray servers survive a crashed launcher or test run,
* is stopped with its graceful signal, then SIGKILL to its process group after a timeout.
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
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "COMMAND_TIMEOUT",
    "HOST",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "BackendUnavailable",
    "ServerProcess",
    "ServerStartError",
    "clean_env",
    "death_signal_preexec",
    "free_port",
    "launch",
    "log_tail",
    "require",
    "run_command",
]

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
"""Seconds to wait for a server to accept connections."""
STOP_TIMEOUT = 30.0
"""Seconds to wait for a graceful shutdown before SIGKILL."""
COMMAND_TIMEOUT = 120.0
"""Seconds allowed for a helper command (initdb, psql, mariadb, nginx -t, ...)."""

LOG_TAIL_LINES = 40
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = re.compile(r"address already in use|could not bind|can't start server", re.I)

# Never let the helpers pick up a developer's or CI's ambient client configuration.
_SCRUBBED_ENV_PREFIXES = ("PG", "MYSQL", "MARIADB", "REDIS")


class BackendUnavailable(RuntimeError):
    """A server binary is not installed (the message names the Debian package)."""


class ServerStartError(RuntimeError):
    """A server (or its initialisation command) failed or did not become ready in time."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that is currently free (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<empty>"


def require(binary: str, package: str, *, candidates: Sequence[Path] = ()) -> str:
    """The path of ``binary`` (first of ``candidates``, then PATH), or :class:`BackendUnavailable`."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(binary)
    if found is None:
        raise BackendUnavailable(
            f"{binary!r} not found: install the Debian package {package!r} "
            f"(`apt-get install -y {package}`); scripts/test.sh installs every test dependency."
        )
    return found


def is_root() -> bool:
    return os.geteuid() == 0


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- parent-death signal: servers must not outlive a killed owner --------------------

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl


def death_signal_preexec(sig: signal.Signals) -> Callable[[], None] | None:
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


class ServerProcess:
    """One long-running server process with its log file; :meth:`restart` runs it again."""

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
        self.death_signal = death_signal
        self.cwd = cwd
        self.user = user
        self._log: IO[bytes] | None = None
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user, group=self.user, extra_groups=[])
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=clean_env(),
                start_new_session=True,  # own process group: Ctrl-C does not hit it, killpg does
                preexec_fn=death_signal_preexec(self.death_signal),
                **kwargs,
            )
        except BaseException:
            log.close()
            raise
        self._log = log
        return proc

    @property
    def pid(self) -> int:
        return self.proc.pid

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
                    f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} did not accept connections within {timeout:.0f} s.\n"
                    f"command: {shlex.join(self.argv)}\n"
                    f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def port_was_taken(self) -> bool:
        return not self.running and bool(_ADDRESS_IN_USE.search(log_tail(self.log_path)))

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
            self._kill_leftovers()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _kill_leftovers(self) -> None:
        """Children the leader left behind when it died (nginx's workers keep its ports): kill its group.

        The group id is the leader's pid, which the kernel does not hand out again while the group
        has members; an empty group only gives ESRCH.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def restart(self, check: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Stop the process if it still runs, start the same command again, wait for ``check``."""
        self.stop()
        self.proc = self._spawn()
        self.wait_ready(check, timeout)


class Supervised:
    """A server we run through a :class:`ServerProcess` (or not yet, or not here): is it up, its pid."""

    _process: ServerProcess | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


def launch(
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
    timeout: float = START_TIMEOUT,
) -> tuple[ServerProcess, int]:
    """Start a server and wait until ``check(port)`` succeeds.

    With ``port=None`` a free port is picked, and a fresh one is tried (a few times) if another
    process grabbed it between :func:`free_port` and the server's bind.
    """
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        proc = ServerProcess(
            name,
            make_argv(chosen),
            log_path,
            stop_signal=stop_signal,
            death_signal=death_signal,
            cwd=cwd,
            user=user,
        )
        try:
            proc.wait_ready(functools.partial(check, chosen), timeout)
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


def run_command(
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
            env=clean_env(),
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
        tail = "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
        raise ServerStartError(f"{what} failed with exit code {result.returncode}: {shlex.join(argv)}\n{tail}")
    stdout: str = result.stdout
    return stdout
