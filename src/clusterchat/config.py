"""Node configuration: read at the edge (the command line), passed in everywhere else."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 7000
    ws_port: int = 7001
    db_url: str = field(default_factory=lambda: f"sqlite:///{Path.cwd() / 'clusterchat.db'}")
    redis_url: str | None = None
    name: str | None = None
    duplicate_login: str = "kick"  # or "reject"
    max_frame: int = 65536
    rate_limit: float = 50.0  # requests a second per connection; 0 turns it off
    idle_timeout: float = 90.0  # seconds without a frame before a connection is closed
    max_buffer: int = 2 * 1024 * 1024  # bytes queued to a client before it is dropped
    token_ttl: float = 24 * 3600.0
    advertise_host: str | None = None  # the host clients are told to reach (rooms)
    argon2_memory_kib: int = 19456
    argon2_time_cost: int = 2
    db_pool_size: int = 10

    @property
    def rate_burst(self) -> float:
        return max(1.0, 2 * self.rate_limit)

    def node_name(self, port: int) -> str:
        return self.name or f"{socket.gethostname()}-{port}"

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.host
