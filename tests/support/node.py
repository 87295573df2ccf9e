"""Running a real `clusterchat serve` subprocess for tests, on free ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY = re.compile(r"^clusterchat node (\S+) listening on tcp://([^:]+):(\d+) ws://([^:]+):(\d+)/ws$")


class NodeProcess:
    """A node subprocess. `port`/`ws_port` are known once it printed its ready line."""

    def __init__(self, db_url: str, workdir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.extra = list(extra)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.name = ""
        self.host = "127.0.0.1"
        self.port = 0
        self.ws_port = 0
        self.log_path = workdir / "node.log"
        self._stdout: list[str] = []

    def start(self, timeout: float = 30) -> NodeProcess:
        """Start the node (again, on the same ports if it ran before) and wait until it is ready."""
        port = str(self.port) if self.port else "0"
        ws_port = str(self.ws_port) if self.ws_port else "0"
        cmd = [sys.executable, "-m", "clusterchat", "serve", "--host", "127.0.0.1", "--port", port,
               "--ws-port", ws_port, "--db", self.db_url, "--argon2-memory", "1024", *self.extra]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - closed when the process ends
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        ready = threading.Event()
        stdout = self.proc.stdout

        def pump() -> None:
            for line in stdout:
                self._stdout.append(line)
                m = READY.match(line.strip())
                if m:
                    self.name, self.host = m.group(1), m.group(2)
                    self.port, self.ws_port = int(m.group(3)), int(m.group(5))
                    ready.set()
            log.close()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"node did not start (exit {self.proc.returncode}):\n{self.log_tail()}")
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@contextmanager
def run_node(db_url: str, workdir: Path, *extra: str) -> Iterator[NodeProcess]:
    node = NodeProcess(db_url, workdir, *extra).start()
    try:
        yield node
    finally:
        node.kill()
