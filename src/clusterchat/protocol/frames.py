"""Splitting a TCP byte stream into JSON-lines frames (PROTOCOL.md section 1)."""

from __future__ import annotations

from clusterchat.errors import FrameTooLarge

DEFAULT_MAX_FRAME = 65536


class FrameOverflow(FrameTooLarge):
    """A frame over the limit; `frames` are the whole frames read before it, still to serve."""

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class LineSplitter:
    """Feeds on arbitrary chunks, returns whole frames; blank lines are dropped.

    A line (newline excluded) longer than `max_frame` raises FrameTooLarge as soon
    as that is known, without waiting for its end, so memory stays bounded.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = b""
        self._max = max_frame

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        lines = data.split(b"\n")
        tail = lines.pop()
        frames: list[bytes] = []
        limit = self._max
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._buf = b""
                raise FrameOverflow(f"frame of {len(line)} bytes is over the limit of {limit}", frames)
            if line and not line.isspace():
                frames.append(line)
        # A full-size frame may wait for its "\n" with its "\r" already here.
        if len(tail) > limit and not (len(tail) == limit + 1 and tail.endswith(b"\r")):
            raise FrameOverflow(f"frame is over the limit of {limit} bytes", frames)
        self._buf = tail
        return frames
