"""Running `clusterchat cluster` (the launcher) as a subprocess for tests, and reading the addresses it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

READY = re.compile(r"^clusterchat cluster ready: tcp://(\S+):(\d+) ws://(\S+):(\d+)/ws$")
NODE = re.compile(r"^\s+node\s+(\S+) tcp://(\S+):(\d+) ws://(\S+):(\d+)/ws\s+pid (\d+)")
RESTARTED = re.compile(r"^clusterchat cluster: (\S+) restarted: tcp://(\S+):(\d+) ws://\S+:(\d+)/ws pid (\d+)$")


@dataclass
class LaunchedNode:
    name: str
    host: str
    port: int
    ws_port: int
    pid: int


class LauncherProcess:
    """`clusterchat cluster ...`; `host`, `port`, `ws_port` and `nodes` once it printed its ready line."""

    def __init__(self, workdir: Path, *flags: str, node_flags: tuple[str, ...] = ("--argon2-memory", "1024")) -> None:
        self.workdir = workdir
        self.argv = [sys.executable, "-m", "clusterchat", "cluster", *flags, "--", *node_flags]
        self.stderr_path = workdir / "cluster.err"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.host = ""
        self.port = 0
        self.ws_port = 0
        self.nodes: dict[str, LaunchedNode] = {}
        self._ready = threading.Event()
        self._changed = threading.Condition()

    def start(self, timeout: float = 90) -> LauncherProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed when the pump ends
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for raw in stdout:
                line = raw.rstrip("\n")
                with self._changed:
                    self.lines.append(line)
                    if m := NODE.match(line):
                        self.nodes[m.group(1)] = LaunchedNode(m.group(1), m.group(2), int(m.group(3)),
                                                              int(m.group(5)), int(m.group(6)))
                    elif m := RESTARTED.match(line):
                        self.nodes[m.group(1)] = LaunchedNode(m.group(1), m.group(2), int(m.group(3)),
                                                              int(m.group(4)), int(m.group(5)))
                    elif m := READY.match(line):
                        self.host, self.port, self.ws_port = m.group(1), int(m.group(2)), int(m.group(4))
                        self._ready.set()
                    self._changed.notify_all()
            stderr.close()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"cluster did not start (exit {self.proc.returncode}):\n{self.output}")
        return self

    @property
    def output(self) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "--- stdout ---\n" + "\n".join(self.lines) + "\n--- stderr ---\n" + err

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first stdout line (so far or to come) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line matching {pattern!r}:\n{self.output}")
                self._changed.wait(remaining)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        """Every process below the launcher (nodes, nginx and its workers, Redis, the database)."""
        return psutil.Process(self.pid).children(recursive=True)

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 60) -> int:
        """Send ``sig`` and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Last resort: SIGKILL the launcher; its children get their parent-death signal."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
