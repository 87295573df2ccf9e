"""`clusterchat bench baseline`: a bare router, to measure the machine's ceiling in the same run.

A bench figure alone says little on a shared or unknown machine. This router is built
the way a clusterchat node is — one Python process, asyncio under uvloop, one
asyncio.Protocol per TCP connection, JSON lines split on `\\n` and decoded with msgspec,
the frames of one loop turn written to a connection in one write by one `call_soon` —
but does nothing else: no authentication, no storage, no validation beyond decoding,
no cluster. It forwards each `send` by its `to` to that user's connection if it is
here. Running `clusterchat bench direct` against it and against a node on the same
machine gives the node's results as a fraction of what this process model can do at all.

It speaks just enough of PROTOCOL.md for `bench direct` (and `bench idle`): `register`
(an existing name gets its id back), `login` by name with any password, `friend_request`
and `friend_accept` (kept in memory, with the `friend_request` and `friend_added`
events), `send` (a `message` event with the recipient's next `seq`), `ping` and `sync`;
every other op is answered ok. TCP only.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import signal
import sys
import time
from typing import Any

import msgspec

from clusterchat.bench.conn import raise_nofile_limit

_encode = msgspec.json.Encoder().encode
_generic = msgspec.json.Decoder()


class Req(msgspec.Struct):
    """The request fields the router reads; the decoder skips the rest."""

    op: str | None = None
    rid: int | str | None = None
    to: int | None = None
    text: str | None = None
    name: str | None = None
    user_id: int | None = None
    note: str | None = None


_decode = msgspec.json.Decoder(Req).decode


def _ms() -> int:
    return int(time.time() * 1000)


class Router:
    """Everything the connections share: users, friendships, who is connected where."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.friends: dict[int, set[int]] = {}
        self.requests: dict[int, dict[int, tuple[str, int]]] = {}  # target -> asker -> (note, ts)
        self.seqs: dict[int, int] = {}  # last seq of a user who is not connected
        self.online: dict[int, Conn] = {}
        self.conns: set[Conn] = set()
        self.message_ids = itertools.count(1)

    def ref(self, uid: int, online: bool = False) -> dict[str, Any]:
        ref: dict[str, Any] = {"id": uid, "name": self.names[uid]}
        if online:
            ref["online"] = uid in self.online
        return ref

    def befriend(self, a: int, b: int) -> None:
        self.friends.setdefault(a, set()).add(b)
        self.friends.setdefault(b, set()).add(a)
        self.requests.get(a, {}).pop(b, None)
        self.requests.get(b, {}).pop(a, None)

    def push(self, uid: int, frame: bytes) -> None:
        conn = self.online.get(uid)
        if conn is not None:
            conn.write(frame)


class Conn(asyncio.Protocol):
    __slots__ = ("_out", "_tail", "name", "router", "seq", "transport", "uid")

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self._tail = b""
        self._out: list[bytes] | None = None
        self.uid = 0
        self.name = ""
        self.seq = 0  # this user's last inbox seq

    # ---- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.router.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.conns.discard(self)
        self.logout()
        self._out = None

    def data_received(self, data: bytes) -> None:
        lines = (self._tail + data if self._tail else data).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if not line or line.isspace():
                continue
            try:
                req = _decode(line)
            except msgspec.DecodeError:
                self.bad_frame(line)
                continue
            self.handle(req)

    # ---- output: the frames of one loop turn leave in one write ---------------------

    def write(self, frame: bytes) -> None:
        if self._out is None:
            self._out = [frame]
            self.router.loop.call_soon(self._flush)
        else:
            self._out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, None
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def reply(self, req: Req, body: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"op": req.op}
        if req.rid is not None:
            msg["rid"] = req.rid
        msg["ok"] = True
        if body:
            msg.update(body)
        self.write(_encode(msg) + b"\n")

    def fail(self, op: str | None, rid: int | str | None, code: str, message: str) -> None:
        msg: dict[str, Any] = {"op": op} if op is not None else {}
        if rid is not None:
            msg["rid"] = rid
        msg["ok"] = False
        msg["error"] = {"code": code, "message": message}
        self.write(_encode(msg) + b"\n")

    def bad_frame(self, line: bytes) -> None:
        try:
            obj = _generic.decode(line)
        except msgspec.DecodeError:
            obj = None
        if isinstance(obj, dict):  # an object with a field of the wrong type
            op, rid = obj.get("op"), obj.get("rid")
            self.fail(op if isinstance(op, str) else None, rid if isinstance(rid, (int, str)) else None,
                      "bad_request", "a field has the wrong type")
        else:
            self.write(_encode({"event": "error", "error": {"code": "bad_json",
                                                            "message": "the frame is not a JSON object"}}) + b"\n")

    # ---- requests ------------------------------------------------------------------

    def handle(self, req: Req) -> None:
        op = req.op
        if op == "send":  # the hot path
            uid = self.uid
            if not uid:
                self.fail(op, req.rid, "not_logged_in", "log in before `send`")
                return
            router = self.router
            message_id = next(router.message_ids)
            ts = _ms()
            peer = router.online.get(req.to)  # type: ignore[arg-type]
            if peer is not None:
                peer.seq += 1
                peer.write(_encode({"event": "message", "seq": peer.seq, "id": message_id,
                                    "from": {"id": uid, "name": self.name}, "to": req.to, "text": req.text,
                                    "ts": ts}) + b"\n")
            self.reply(req, {"id": message_id, "ts": ts})
        elif op == "ack":
            self.reply(req)
        elif op == "ping":
            self.reply(req, {"ts": _ms()})
        elif op == "register":
            if not req.name:
                self.fail(op, req.rid, "bad_request", "field `name` is missing")
                return
            router = self.router
            known = router.ids.get(req.name)
            if known is None:
                known = router.ids[req.name] = len(router.ids) + 1
                router.names[known] = req.name
            self.reply(req, {"user_id": known})
        elif op == "login":
            self.login(req)
        elif op == "friend_request" or op == "friend_accept":
            self.friend(req)
        elif op == "sync":
            self.reply(req, {"messages": [], "more": False})
        elif op == "logout":
            self.logout()
            self.reply(req)
        elif op is None:
            self.fail(None, req.rid, "bad_request", "field `op` is missing")
        else:
            self.reply(req)

    def login(self, req: Req) -> None:
        router = self.router
        uid = router.ids.get(req.name or "")
        if uid is None:
            self.fail(req.op, req.rid, "bad_credentials", "wrong name or password")
            return
        if self.uid:
            self.fail(req.op, req.rid, "already_logged_in", "this connection is logged in")
            return
        old = router.online.get(uid)
        if old is not None:  # the newer login wins, as on a node
            old.write(b'{"event":"kicked","reason":"logged_in_elsewhere"}\n')
            old.logout()
            old._flush()
            if old.transport is not None:
                old.transport.close()
        self.uid, self.name = uid, router.names[uid]
        self.seq = router.seqs.pop(uid, 0)
        router.online[uid] = self
        asked = router.requests.get(uid, {})
        self.reply(req, {
            "user": router.ref(uid), "token": "x",
            "friends": [router.ref(f, online=True) for f in sorted(router.friends.get(uid, ()))],
            "groups": [],
            "friend_requests": [{"from": router.ref(a), "note": note, "ts": ts} for a, (note, ts) in asked.items()],
            "offline": [], "more": False,
        })

    def logout(self) -> None:
        uid = self.uid
        if uid:
            router = self.router
            if router.online.get(uid) is self:
                del router.online[uid]
            router.seqs[uid] = self.seq
            self.uid = 0

    def friend(self, req: Req) -> None:
        router = self.router
        me, other = self.uid, req.user_id
        if not me:
            self.fail(req.op, req.rid, "not_logged_in", f"log in before `{req.op}`")
            return
        if other is None or other not in router.names or other == me:
            self.fail(req.op, req.rid, "no_such_user", f"no user {other}")
            return
        if other in router.friends.get(me, ()):
            self.fail(req.op, req.rid, "already_friends", f"user {other} is already your friend")
            return
        if req.op == "friend_request" and me not in router.requests.get(other, {}) \
                and other not in router.requests.get(me, {}):
            ts = _ms()
            router.requests.setdefault(other, {})[me] = (req.note or "", ts)
            router.push(other, _encode({"event": "friend_request", "from": router.ref(me),
                                        "note": req.note or "", "ts": ts}) + b"\n")
            self.reply(req)
            return
        if req.op == "friend_request" and me in router.requests.get(other, {}):
            self.reply(req)  # asked already
            return
        # An accept, or a request to someone who had asked first: friends now; the asker hears of it.
        router.befriend(me, other)
        router.push(other, _encode({"event": "friend_added", "friend": router.ref(me, online=True)}) + b"\n")
        self.reply(req, {"friend": router.ref(other, online=True)} if req.op == "friend_accept" else None)


async def run_baseline(host: str, port: int) -> int:
    """Serve until SIGTERM or SIGINT; the exit code."""
    raise_nofile_limit()
    loop = asyncio.get_running_loop()
    router = Router(loop)
    try:
        server = await loop.create_server(lambda: Conn(router), host, port, backlog=4096, reuse_address=True)
    except OSError as exc:
        print(f"clusterchat baseline: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.collect()  # the node's collector settings, for a fair comparison
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    bound = server.sockets[0].getsockname()
    print(f"clusterchat baseline listening on tcp://{bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    server.close()
    for conn in list(router.conns):
        if conn.transport is not None:
            conn.transport.abort()
    await server.wait_closed()
    return 0


__all__ = ["run_baseline"]
