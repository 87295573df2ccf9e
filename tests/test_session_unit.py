"""Session without sockets: a fake outlet and a minimal fake node.

Covers the request pipeline (ordered replies, pipelined vs exclusive ops, login gate),
rate limiting, back-pressure on reading and writing, and the inbox cursor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

import clusterchat.session as session_mod
from clusterchat.config import NodeConfig
from clusterchat.errors import NoSuchUser, NotFriends
from clusterchat.protocol.codec import op_of
from clusterchat.protocol.events import inbox_message_frame
from clusterchat.protocol.requests import ALL_REQUESTS, Request
from clusterchat.session import Session
from clusterchat.storage.inbox import InboxMessage, InboxPage

USER = 1


# ---- fakes ---------------------------------------------------------------------------------


class FakeClock:
    """Stands in for `node.loop`: Session only asks it for `time()`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class FakeOutlet:
    def __init__(self) -> None:
        self.peer = "test:1"
        self.writes: list[bytes] = []
        self.pending_bytes = 0
        self.closed = False
        self.aborted = False
        self.pauses = 0
        self.resumes = 0
        self.drains = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def buffered(self) -> int:
        return self.pending_bytes

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    async def drain(self) -> None:
        self.drains += 1

    @property
    def paused(self) -> bool:
        return self.pauses > self.resumes

    def frames(self) -> list[dict[str, Any]]:
        out = []
        for data in self.writes:
            assert data.endswith(b"\n") and data.count(b"\n") == 1, data
            out.append(json.loads(data))
        return out


def message(seq: int) -> InboxMessage:
    return InboxMessage(seq=seq, id=1000 + seq, sender_id=2, sender_name="bob", to_user=USER, group_id=None,
                        text=f"m{seq}", ts=1763700000000 + seq)


def frame_of(seq: int) -> bytes:
    return inbox_message_frame(message(seq))


class FakeMessages:
    """`node.messages`: the committed inbox, readable with `since`."""

    def __init__(self) -> None:
        self.committed: dict[int, InboxMessage] = {}
        self.calls: list[tuple[int, int, int]] = []
        self.gate: asyncio.Event | None = None  # when set, since() waits for it
        self.on_call: Callable[[int], None] | None = None

    def commit(self, *seqs: int) -> None:
        for seq in seqs:
            self.committed[seq] = message(seq)

    async def since(self, user_id: int, after: int, limit: int) -> InboxPage:
        self.calls.append((user_id, after, limit))
        if self.on_call is not None:
            self.on_call(len(self.calls))
        if self.gate is not None:
            await self.gate.wait()
        rows = [self.committed[s] for s in sorted(self.committed) if s > after]
        last = max(self.committed, default=0)
        return InboxPage(rows[:limit], len(rows) > limit, last, 0)


Handler = Callable[[Session, Request], Any]


class FakeNode:
    def __init__(self, rate_limit: float = 0.0, max_buffer: int = 1 << 20) -> None:
        self.config = NodeConfig(rate_limit=rate_limit, max_buffer=max_buffer)
        self.loop = FakeClock()
        self.connections: set[Session] = set()
        self.dispatched: list[Request] = []
        self.handler: Handler = lambda s, r: {"echo": op_of(r)}
        self.ended: list[Session] = []
        self.messages = FakeMessages()
        self.tasks: set[asyncio.Task[Any]] = set()

    def dispatch(self, session: Session, request: Request) -> Any:
        self.dispatched.append(request)
        return self.handler(session, request)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def reply_body(self, op: str, result: Any) -> dict[str, Any] | None:
        return None if result is None else {"result": result}

    def session_ended(self, session: Session) -> None:
        self.ended.append(session)

    def message_frame(self, m: InboxMessage) -> bytes:
        return inbox_message_frame(m)

    @property
    def rids(self) -> list[Any]:
        return [r.rid for r in self.dispatched]


def make(*, logged_in: bool = True, rate_limit: float = 0.0,
         max_buffer: int = 1 << 20) -> tuple[FakeNode, FakeOutlet, Session]:
    node = FakeNode(rate_limit=rate_limit, max_buffer=max_buffer)
    outlet = FakeOutlet()
    session = Session(cast(Any, node), outlet)
    if logged_in:
        session.user_id = USER
        session.user_name = "alice"
    return node, outlet, session


def req(op: str, rid: Any = None, **fields: Any) -> bytes:
    obj: dict[str, Any] = {"op": op, **fields}
    if rid is not None:
        obj["rid"] = rid
    return json.dumps(obj).encode()


def ping(rid: Any) -> bytes:
    return req("ping", rid)


def send(rid: Any) -> bytes:
    return req("send", rid, to=2, text="hi")


def friends(rid: Any) -> bytes:
    return req("friends", rid)


class Futures:
    """A handler whose every request returns a future, resolved by hand, keyed by rid."""

    def __init__(self) -> None:
        self.by_rid: dict[Any, asyncio.Future[Any]] = {}

    def __call__(self, session: Session, request: Request) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.by_rid[request.rid] = future
        return future


async def settle() -> None:
    """Let done-callbacks and ready tasks run."""
    for _ in range(10):
        await asyncio.sleep(0)


def rids_written(outlet: FakeOutlet) -> list[Any]:
    return [f.get("rid") for f in outlet.frames()]


# ---- construction / lifecycle -----------------------------------------------------------------


def test_session_registers_with_the_node_and_leaves_on_close() -> None:
    node, outlet, session = make()
    assert session in node.connections
    session.close()
    assert outlet.closed
    assert session.closed
    assert session not in node.connections
    assert node.ended == [session]
    session.close()  # idempotent
    session.on_connection_lost()
    assert node.ended == [session]


def test_logged_out_session_closing_does_not_end_a_user_session() -> None:
    node, _, session = make(logged_in=False)
    session.on_connection_lost()
    assert node.ended == []
    assert session not in node.connections


def test_frames_after_close_are_ignored() -> None:
    node, outlet, session = make()
    session.close()
    session.on_frames([ping(1)])
    assert node.dispatched == []
    assert outlet.writes == []


def test_frames_update_last_frame_time() -> None:
    node, _, session = make()
    node.loop.now += 42.0
    session.on_frames([ping(1)])
    assert session.last_frame == node.loop.now


def test_frame_too_large_writes_the_error_event_and_closes() -> None:
    from clusterchat.errors import FrameTooLarge

    node, outlet, session = make()
    session.on_frame_too_large(FrameTooLarge("frame of 70000 bytes is over the limit of 65536"))
    assert outlet.frames() == [{"event": "error", "error": {
        "code": "frame_too_large", "message": "frame of 70000 bytes is over the limit of 65536"}}]
    assert outlet.closed and session.closed and session not in node.connections


# ---- immediate replies ------------------------------------------------------------------------------


def test_immediate_replies_are_written_at_once() -> None:
    node, outlet, session = make()
    session.on_frames([ping(1), friends("b"), req("logout", 3)])
    assert outlet.frames() == [
        {"op": "ping", "rid": 1, "ok": True, "echo": "ping"},
        {"op": "friends", "rid": "b", "ok": True, "echo": "friends"},
        {"op": "logout", "rid": 3, "ok": True, "echo": "logout"},
    ]
    assert node.rids == [1, "b", 3]


def test_str_frames_from_websocket_work() -> None:
    _, outlet, session = make()
    session.on_frames(['{"op":"ping","rid":"w"}'])
    assert outlet.frames()[0]["rid"] == "w"


def test_none_result_gives_a_bare_ok() -> None:
    node, outlet, session = make()
    node.handler = lambda s, r: None
    session.on_frames([req("ack", 5, seq=3)])
    assert outlet.frames() == [{"op": "ack", "rid": 5, "ok": True}]


def test_chat_error_raised_by_dispatch_becomes_its_error_reply() -> None:
    node, outlet, session = make()

    def handler(s: Session, r: Request) -> Any:
        raise NotFriends("user 2 is not your friend")

    node.handler = handler
    session.on_frames([send(1)])
    assert outlet.frames() == [{"op": "send", "rid": 1, "ok": False,
                                "error": {"code": "not_friends", "message": "user 2 is not your friend"}}]


def test_unexpected_exception_becomes_internal_without_detail(caplog: pytest.LogCaptureFixture) -> None:
    node, outlet, session = make()

    def handler(s: Session, r: Request) -> Any:
        raise RuntimeError("SELECT password FROM users -- secret hunter2")

    node.handler = handler
    session.on_frames([friends(1), ping(2)])
    first, second = outlet.frames()
    assert first == {"op": "friends", "rid": 1, "ok": False, "error": {"code": "internal",
                                                                      "message": "internal error"}}
    assert "hunter2" not in outlet.writes[0].decode()
    assert second["rid"] == 2 and second["ok"] is False  # the session keeps going
    assert not session.closed


def test_malformed_frames_get_errors_in_order() -> None:
    node, outlet, session = make()
    session.on_frames([b"not json", b'{"rid":1}', req("nope", 2), req("send", 3, to=0, text="x"), b"[1]", ping(4)])
    out = outlet.frames()
    assert out[0] == {"event": "error", "error": {"code": "bad_json", "message": "the frame is not valid JSON"}}
    assert out[1] == {"rid": 1, "ok": False, "error": {"code": "bad_request", "message": "field `op` is missing"}}
    assert out[2]["op"] == "nope" and out[2]["rid"] == 2 and out[2]["error"]["code"] == "unknown_op"
    assert out[3]["op"] == "send" and out[3]["rid"] == 3 and out[3]["error"]["code"] == "bad_request"
    assert "`to`" in out[3]["error"]["message"]
    assert out[4]["event"] == "error" and out[4]["error"]["code"] == "bad_json"
    assert out[5] == {"op": "ping", "rid": 4, "ok": True, "echo": "ping"}
    assert node.rids == [4]
    assert not session.closed


# ---- login gate ----------------------------------------------------------------------------------

NEEDS_LOGIN = sorted(str(cls.__struct_config__.tag) for cls in ALL_REQUESTS if cls.needs_login)

SAMPLE_FIELDS: dict[str, dict[str, Any]] = {
    "lookup": {"name": "bob"}, "friend_request": {"user_id": 2}, "friend_accept": {"user_id": 2},
    "friend_reject": {"user_id": 2}, "unfriend": {"user_id": 2}, "create_group": {"name": "g"},
    "join_group": {"group_id": 1}, "leave_group": {"group_id": 1}, "send": {"to": 2, "text": "x"},
    "group_send": {"group_id": 1, "text": "x"}, "ack": {"seq": 1}, "sync": {"after": 0}, "history": {"with": 2},
    "join_room": {"room_id": "r"}, "room_send": {"room_id": "r", "text": "x"}, "leave_room": {"room_id": "r"},
    "register": {"name": "alice", "password": "secret1"}, "login": {"token": "t"},
}  # fmt: skip


def test_needs_login_ops_are_all_but_register_login_ping() -> None:
    assert len(NEEDS_LOGIN) == len(ALL_REQUESTS) - 3
    assert not {"register", "login", "ping"} & set(NEEDS_LOGIN)


@pytest.mark.parametrize("op", NEEDS_LOGIN)
def test_not_logged_in(op: str) -> None:
    node, outlet, session = make(logged_in=False)
    session.on_frames([req(op, "r", **SAMPLE_FIELDS.get(op, {}))])
    assert node.dispatched == []
    [reply] = outlet.frames()
    assert reply["op"] == op and reply["rid"] == "r" and reply["ok"] is False
    assert reply["error"]["code"] == "not_logged_in"


@pytest.mark.parametrize("op", ["register", "login", "ping"])
def test_ops_allowed_logged_out_are_dispatched(op: str) -> None:
    node, outlet, session = make(logged_in=False)
    session.on_frames([req(op, "r", **SAMPLE_FIELDS.get(op, {}))])
    assert [op_of(r) for r in node.dispatched] == [op]
    assert outlet.frames()[0]["ok"] is True


async def test_not_logged_in_reply_waits_its_turn() -> None:
    node, outlet, session = make(logged_in=False)
    futures = Futures()
    node.handler = futures
    session.on_frames([ping(1), send(2), ping(3)])
    assert outlet.writes == []
    futures.by_rid[3].set_result({})
    await settle()
    assert outlet.writes == []
    futures.by_rid[1].set_result({})
    await settle()
    assert rids_written(outlet) == [1, 2, 3]
    assert outlet.frames()[1]["error"]["code"] == "not_logged_in"


# ---- ordering: pipelined and exclusive ----------------------------------------------------------------


async def test_pipelined_replies_are_written_in_request_order() -> None:
    node, outlet, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([send(1), send(2), req("ack", 3, seq=1), ping(4)])
    assert node.rids == [1, 2, 3, 4]  # pipelined: all started at once
    futures.by_rid[4].set_result({"ts": 4})
    futures.by_rid[2].set_result({"id": 20, "ts": 2})
    await settle()
    assert outlet.writes == []  # 1 is still running
    futures.by_rid[1].set_result({"id": 10, "ts": 1})
    await settle()
    assert rids_written(outlet) == [1, 2]  # 3 is still running
    futures.by_rid[3].set_result(None)
    await settle()
    assert outlet.frames() == [
        {"op": "send", "rid": 1, "ok": True, "id": 10, "ts": 1},
        {"op": "send", "rid": 2, "ok": True, "id": 20, "ts": 2},
        {"op": "ack", "rid": 3, "ok": True},
        {"op": "ping", "rid": 4, "ok": True, "ts": 4},
    ]


async def test_immediate_reply_behind_a_running_request_waits() -> None:
    node, outlet, session = make()
    futures = Futures()

    def handler(s: Session, r: Request) -> Any:
        return futures(s, r) if r.rid == 1 else {"now": r.rid}

    node.handler = handler
    session.on_frames([send(1), ping(2), send(3)])
    assert outlet.writes == []
    futures.by_rid[1].set_result({"id": 1, "ts": 1})
    await settle()
    assert rids_written(outlet) == [1, 2, 3]


async def test_exclusive_op_waits_for_earlier_replies_and_blocks_later_requests() -> None:
    node, outlet, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([send(1), friends(2), send(3), ping(4)])
    assert node.rids == [1]  # friends waits for send 1's reply
    futures.by_rid[1].set_result({"id": 1, "ts": 1})
    await settle()
    assert rids_written(outlet) == [1]
    assert node.rids == [1, 2]  # friends runs; 3 and 4 wait for it
    await settle()
    assert node.rids == [1, 2]
    futures.by_rid[2].set_result({"friends": []})
    await settle()
    assert node.rids == [1, 2, 3, 4]
    assert rids_written(outlet) == [1, 2]
    futures.by_rid[4].set_result({})
    futures.by_rid[3].set_result({"id": 3, "ts": 3})
    await settle()
    assert rids_written(outlet) == [1, 2, 3, 4]


async def test_exclusive_ops_run_one_at_a_time() -> None:
    node, outlet, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([friends(1), req("groups", 2), req("friend_accept", 3, user_id=2)])
    assert node.rids == [1]
    futures.by_rid[1].set_result({})
    await settle()
    assert node.rids == [1, 2]
    futures.by_rid[2].set_result({})
    await settle()
    assert node.rids == [1, 2, 3]
    futures.by_rid[3].set_result({})
    await settle()
    assert rids_written(outlet) == [1, 2, 3]


async def test_exclusive_op_with_immediate_reply_does_not_block() -> None:
    node, outlet, session = make()
    session.on_frames([friends(1), friends(2), send(3)])
    assert node.rids == [1, 2, 3]
    assert rids_written(outlet) == [1, 2, 3]


async def test_coroutine_outcome_is_spawned_and_its_result_goes_through_reply_body() -> None:
    node, outlet, session = make()
    release = asyncio.Event()

    async def work(value: Any) -> Any:
        await release.wait()
        return value

    results: dict[Any, Any] = {1: 1234, 2: {"plain": True}, 3: None}
    node.handler = lambda s, r: work(results[r.rid])
    session.on_frames([send(1), send(2), send(3)])
    await settle()
    assert outlet.writes == []
    release.set()
    await settle()
    assert outlet.frames() == [
        {"op": "send", "rid": 1, "ok": True, "result": 1234},
        {"op": "send", "rid": 2, "ok": True, "plain": True},
        {"op": "send", "rid": 3, "ok": True},
    ]


async def test_failed_and_cancelled_futures_become_error_replies_in_order() -> None:
    node, outlet, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([send(1), send(2), send(3), friends(4), ping(5)])
    futures.by_rid[3].cancel()
    futures.by_rid[2].set_exception(RuntimeError("secret hunter2"))
    futures.by_rid[1].set_exception(NoSuchUser("no user 2"))
    await settle()
    assert node.rids == [1, 2, 3, 4]
    futures.by_rid[4].set_exception(NotFriends())
    await settle()
    futures.by_rid[5].set_result({})
    await settle()
    out = outlet.frames()
    assert [f["rid"] for f in out] == [1, 2, 3, 4, 5]
    assert out[0]["error"] == {"code": "no_such_user", "message": "no user 2"}
    assert out[1]["error"] == {"code": "internal", "message": "internal error"}
    assert out[2]["error"]["code"] == "unavailable"
    assert out[3]["error"]["code"] == "not_friends"
    assert out[4]["ok"] is True
    assert b"hunter2" not in b"".join(outlet.writes)


async def test_exclusive_request_failing_unblocks_the_rest() -> None:
    node, _, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([friends(1), ping(2)])
    futures.by_rid[1].set_exception(RuntimeError("boom"))
    await settle()
    assert node.rids == [1, 2]


async def test_after_reply_runs_right_after_the_exclusive_reply_is_written() -> None:
    node, outlet, session = make()
    futures = Futures()
    seen: list[list[Any]] = []

    def handler(s: Session, r: Request) -> Any:
        future = futures(s, r)
        if r.rid == "login":
            async def login() -> Any:
                s.after_reply(lambda: seen.append(rids_written(outlet)))
                return await future
            return login()
        return future

    node.handler = handler
    session.on_frames([req("login", "login", token="t"), ping(2)])
    await settle()
    assert seen == []
    futures.by_rid["login"].set_result({"user": {"id": 1}})
    await settle()
    assert seen == [["login"]]  # after the login reply, before anything else
    futures.by_rid[2].set_result({})
    await settle()
    assert rids_written(outlet) == ["login", 2]


def test_after_reply_without_a_running_request_runs_at_once() -> None:
    _, _, session = make()
    called: list[int] = []
    session.after_reply(lambda: called.append(1))
    assert called == [1]


async def test_replies_to_a_closed_session_are_dropped() -> None:
    node, outlet, session = make()
    futures = Futures()
    node.handler = futures
    session.on_frames([send(1), friends(2)])
    session.close()
    futures.by_rid[1].set_result({"id": 1, "ts": 1})
    await settle()
    assert outlet.writes == []
    assert node.rids == [1]  # queued requests are dropped with the connection


# ---- rate limiting ----------------------------------------------------------------------------------


def test_rate_limit_burst_then_rate_limited() -> None:
    node, outlet, session = make(rate_limit=5)
    assert node.config.rate_burst == 10
    session.on_frames([ping(i) for i in range(1, 12)])
    out = outlet.frames()
    assert [f["rid"] for f in out] == list(range(1, 12))
    assert all(f["ok"] for f in out[:10])
    assert out[10]["ok"] is False
    assert out[10]["op"] == "ping"
    assert out[10]["error"]["code"] == "rate_limited"
    assert node.rids == list(range(1, 11))  # the limited request was not carried out


def test_rate_limit_refills_at_the_rate() -> None:
    node, outlet, session = make(rate_limit=5)
    session.on_frames([ping(i) for i in range(10)])
    session.on_frames([ping("x")])
    assert outlet.frames()[-1]["error"]["code"] == "rate_limited"
    node.loop.now += 0.21  # one token at 5/s
    session.on_frames([ping("a"), ping("b")])
    a, b = outlet.frames()[-2:]
    assert a["ok"] is True
    assert b["error"]["code"] == "rate_limited"


def test_rate_limit_burst_is_capped_after_idling() -> None:
    node, outlet, session = make(rate_limit=5)
    node.loop.now += 3600
    session.on_frames([ping(i) for i in range(11)])
    assert [f["ok"] for f in outlet.frames()] == [True] * 10 + [False]


def test_rate_limit_sustained_rate_is_allowed() -> None:
    node, outlet, session = make(rate_limit=5)
    for _ in range(50):
        session.on_frames([ping(1)])
        node.loop.now += 0.2
    assert all(f["ok"] for f in outlet.frames())


def test_rate_limit_zero_means_unlimited() -> None:
    node, outlet, session = make(rate_limit=0)
    session.on_frames([ping(i) for i in range(1000)])
    assert all(f["ok"] for f in outlet.frames())
    assert len(node.dispatched) == 1000


def test_rate_limit_applies_before_the_login_check() -> None:
    _, outlet, session = make(logged_in=False, rate_limit=5)
    session.on_frames([friends(i) for i in range(11)])
    codes = [f["error"]["code"] for f in outlet.frames()]
    assert codes == ["not_logged_in"] * 10 + ["rate_limited"]


async def test_rate_limited_reply_is_still_in_order() -> None:
    node, outlet, session = make(rate_limit=5)
    futures = Futures()
    node.handler = futures
    session.on_frames([send(i) for i in range(1, 13)])
    assert node.rids == list(range(1, 11))
    assert outlet.writes == []  # 11 and 12 are refused, but their replies wait behind 1..10
    for rid in reversed(range(1, 11)):
        futures.by_rid[rid].set_result({"id": rid, "ts": rid})
        await settle()
    out = outlet.frames()
    assert [f["rid"] for f in out] == list(range(1, 13))
    assert [f["ok"] for f in out] == [True] * 10 + [False, False]
    assert {f["error"]["code"] for f in out[10:]} == {"rate_limited"}


# ---- back-pressure -----------------------------------------------------------------------------------


async def test_reading_pauses_when_too_many_requests_wait_and_resumes() -> None:
    node, outlet, session = make()
    futures = Futures()

    def handler(s: Session, r: Request) -> Any:
        return futures(s, r) if op_of(r) == "friends" else {}

    node.handler = handler
    limit = session_mod.MAX_WAITING
    session.on_frames([friends("f1")] + [ping(i) for i in range(limit)])
    assert not outlet.paused  # exactly MAX_WAITING waiting
    session.on_frames([ping("one more")])
    assert outlet.pauses == 1
    session.on_frames([ping("and another")])
    assert outlet.pauses == 1  # paused once, not again
    futures.by_rid["f1"].set_result({})
    await settle()
    assert outlet.resumes == 1
    assert not outlet.paused
    assert len(node.dispatched) == 1 + limit + 2
    assert len(outlet.writes) == 1 + limit + 2


async def test_reading_resumes_only_below_half_the_limit() -> None:
    node, outlet, session = make()
    futures = Futures()

    def handler(s: Session, r: Request) -> Any:
        return futures(s, r) if op_of(r) == "friends" else {}

    node.handler = handler
    half = session_mod.MAX_WAITING // 2
    session.on_frames([friends("f1")] + [ping(i) for i in range(half)] + [friends("f2")]
                      + [ping(i) for i in range(half + 10)])
    assert outlet.paused
    futures.by_rid["f1"].set_result({})
    await settle()
    assert node.dispatched[-1].rid == "f2"
    assert outlet.paused  # half + 10 still waiting behind f2
    futures.by_rid["f2"].set_result({})
    await settle()
    assert not outlet.paused
    assert outlet.resumes == 1


def test_write_to_an_outlet_over_max_buffer_closes_the_session() -> None:
    node, outlet, session = make(max_buffer=1000)
    outlet.pending_bytes = 1000
    session.on_frames([ping(1)])
    assert len(outlet.writes) == 1  # at the limit is still fine
    outlet.pending_bytes = 1001
    session.on_frames([ping(2)])
    assert len(outlet.writes) == 1
    assert outlet.closed
    assert outlet.aborted  # not a graceful close: that would wait for a flush that never comes
    assert session.closed
    assert session not in node.connections
    assert node.ended == [session]
    session.on_frames([ping(3)])
    session.deliver(1, frame_of(1))
    assert len(outlet.writes) == 1


def test_event_write_over_max_buffer_closes_the_session() -> None:
    _, outlet, session = make(max_buffer=10)
    session.begin_login()
    session.end_login(0, more=False)
    outlet.pending_bytes = 11
    session.deliver(1, frame_of(1))
    assert outlet.writes == []
    assert outlet.closed and session.closed


# ---- inbox cursor ---------------------------------------------------------------------------------------


def live(session: Session, last_seq: int) -> None:
    session.begin_login()
    session.end_login(last_seq=last_seq, more=False)


async def wait_tasks(node: FakeNode) -> None:
    while node.tasks:
        await asyncio.wait(list(node.tasks), timeout=5)
    await settle()


def test_events_before_login_are_dropped() -> None:
    _, outlet, session = make(logged_in=False)
    session.deliver(1, frame_of(1))
    assert outlet.writes == []


def test_live_in_order_and_duplicates_dropped() -> None:
    node, outlet, session = make()
    live(session, 3)
    session.deliver(4, frame_of(4))
    assert outlet.writes == [frame_of(4)]
    session.deliver(4, frame_of(4))
    session.deliver(2, frame_of(2))
    session.deliver(3, frame_of(3))
    assert outlet.writes == [frame_of(4)]
    session.deliver(5, frame_of(5))
    assert outlet.writes == [frame_of(4), frame_of(5)]
    assert [f["seq"] for f in outlet.frames()] == [4, 5]
    assert node.messages.calls == []
    assert node.tasks == set()


async def test_gap_triggers_catch_up_from_the_database() -> None:
    node, outlet, session = make()
    node.messages.commit(4, 5, 6)
    live(session, 3)
    session.deliver(4, frame_of(4))
    session.deliver(6, frame_of(6))  # 5 is committed but its event has not come yet
    assert outlet.writes == [frame_of(4)]
    await wait_tasks(node)
    assert node.messages.calls[0] == (USER, 4, 1)  # reads only the gap
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6]
    assert outlet.writes == [frame_of(4), frame_of(5), frame_of(6)]
    session.deliver(5, frame_of(5))  # the late event is a duplicate now
    session.deliver(7, frame_of(7))
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6, 7]


async def test_catch_up_to_fetches_what_the_cluster_bus_lost() -> None:
    """After a resubscription the node tells each session its inbox's newest seq."""
    node, outlet, session = make()
    node.messages.commit(4, 5, 6)
    live(session, 3)
    session.catch_up_to(3)  # nothing new: no read
    assert node.tasks == set() and node.messages.calls == []
    session.catch_up_to(6)
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6]
    session.deliver(5, frame_of(5))  # the lost event turns up after all: a duplicate
    session.deliver(7, frame_of(7))
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6, 7]


async def test_catch_up_to_during_login_waits_for_the_login_reply() -> None:
    node, outlet, session = make()
    node.messages.commit(3, 4)
    session.begin_login()
    session.catch_up_to(4)  # the login's offline read ends at 2; 3 and 4 came meanwhile
    assert node.tasks == set()
    session.end_login(last_seq=2, more=False)
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [3, 4]
    logged_out = make(logged_in=False)
    logged_out[2].catch_up_to(9)
    assert logged_out[0].tasks == set() and logged_out[0].messages.calls == []


async def test_events_arriving_during_catch_up_are_held_and_written_in_order() -> None:
    node, outlet, session = make()
    node.messages.commit(4, 5, 6, 7, 8)  # an event is published only after its commit
    node.messages.gate = asyncio.Event()
    live(session, 3)
    session.deliver(5, frame_of(5))
    await settle()
    assert len(node.messages.calls) == 1  # the catch-up is reading
    for seq in (8, 6, 7, 5, 6):
        session.deliver(seq, frame_of(seq))
    assert outlet.writes == []
    node.messages.gate.set()
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6, 7, 8]
    session.deliver(9, frame_of(9))
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6, 7, 8, 9]


async def test_catch_up_retries_until_the_missing_messages_are_visible() -> None:
    node, outlet, session = make()
    node.messages.commit(4)

    def on_call(n: int) -> None:
        if n == 3:
            node.messages.commit(5, 6)  # readable only from the third read on

    node.messages.on_call = on_call
    live(session, 3)
    session.deliver(6, frame_of(6))
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6]
    assert [after for _, after, _ in node.messages.calls] == [3, 4, 4]
    assert outlet.drains >= 1  # it waits for the client to take pages


async def test_catch_up_from_before_a_relogin_writes_nothing_during_the_new_login() -> None:
    node, outlet, session = make()
    node.messages.commit(4, 5)
    node.messages.gate = asyncio.Event()
    live(session, 3)
    session.deliver(5, frame_of(5))  # gap: a catch-up starts reading
    await settle()
    assert len(node.messages.calls) == 1
    # logout (SessionService.end), then a new login of the same user on this connection
    session.user_id = None
    session.end_session()
    session.user_id = USER
    session.begin_login()
    node.messages.gate.set()  # the old catch-up's read returns
    await wait_tasks(node)
    assert outlet.writes == []  # nothing may come before the new login reply
    session.deliver(6, frame_of(6))
    assert outlet.writes == []  # still logging in: held
    session.end_login(last_seq=5, more=False)
    assert outlet.writes == [frame_of(6)]


async def test_catch_up_reads_page_after_page() -> None:
    node, outlet, session = make()
    node.messages.commit(*range(1, 1201))
    live(session, 0)
    session.deliver(1200, frame_of(1200))
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == list(range(1, 1201))
    assert node.messages.calls == [(USER, 0, 500), (USER, 500, 500), (USER, 1000, 199)]
    session.deliver(1201, frame_of(1201))
    assert outlet.writes[-1] == frame_of(1201)


async def test_catch_up_stops_when_the_session_closes() -> None:
    node, outlet, session = make()
    node.messages.commit(4, 5)
    node.messages.gate = asyncio.Event()
    live(session, 3)
    session.deliver(5, frame_of(5))
    await settle()
    session.close()
    node.messages.gate.set()
    await wait_tasks(node)
    assert outlet.writes == []


async def test_events_during_login_are_held_then_written_in_order_without_duplicates() -> None:
    node, outlet, session = make()
    session.begin_login()
    for seq in (5, 2, 3, 4, 5, 6, 1):
        session.deliver(seq, frame_of(seq))
    assert outlet.writes == []
    session.end_login(last_seq=3, more=False)
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6]
    assert outlet.writes == [frame_of(4), frame_of(5), frame_of(6)]
    assert node.messages.calls == []
    session.deliver(7, frame_of(7))
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6, 7]


async def test_gap_in_events_held_during_login_is_filled_from_the_database() -> None:
    node, outlet, session = make()
    node.messages.commit(4, 5, 6)
    session.begin_login()
    session.deliver(6, frame_of(6))
    session.end_login(last_seq=3, more=False)
    assert outlet.writes == []
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [4, 5, 6]


async def test_login_overflowing_the_held_events_catches_up() -> None:
    node, outlet, session = make()
    total = session_mod.MAX_PENDING_EVENTS + 10
    node.messages.commit(*range(1, total + 1))
    session.begin_login()
    for seq in range(1, total + 1):
        session.deliver(seq, frame_of(seq))
    assert len(session._pending) <= session_mod.MAX_PENDING_EVENTS  # memory stays bounded
    session.end_login(last_seq=0, more=False)
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == list(range(1, total + 1))


def test_login_begins_fresh() -> None:
    _, outlet, session = make()
    session.begin_login()
    session.deliver(5, frame_of(5))
    session.begin_login()  # a second login on the connection forgets the first one's held events
    session.end_login(last_seq=4, more=False)
    assert outlet.writes == []


async def test_paused_writes_nothing_until_synced() -> None:
    node, outlet, session = make()
    session.begin_login()
    session.deliver(4, frame_of(4))
    session.end_login(last_seq=3, more=True)
    session.deliver(5, frame_of(5))
    session.deliver(6, frame_of(6))
    await settle()
    assert outlet.writes == []
    assert node.messages.calls == []
    session.synced(6)  # the sync reply gave the client 4..6
    await settle()
    assert outlet.writes == []
    assert node.messages.calls == []
    session.deliver(6, frame_of(6))
    session.deliver(7, frame_of(7))
    assert outlet.writes == [frame_of(7)]


async def test_events_missed_while_paused_are_caught_up_after_sync() -> None:
    node, outlet, session = make()
    node.messages.commit(*range(1, 9))
    session.begin_login()
    session.end_login(last_seq=3, more=True)
    session.deliver(7, frame_of(7))
    session.deliver(8, frame_of(8))
    assert outlet.writes == []
    session.synced(5)  # the client synced up to 5 while 6..8 were committed
    await wait_tasks(node)
    assert [f["seq"] for f in outlet.frames()] == [6, 7, 8]


def test_end_session_stops_events() -> None:
    _, outlet, session = make()
    live(session, 0)
    session.deliver(1, frame_of(1))
    session.end_session()
    session.deliver(2, frame_of(2))
    assert outlet.writes == [frame_of(1)]


def test_synced_while_live_moves_the_cursor_forward() -> None:
    _, outlet, session = make()
    live(session, 0)
    session.synced(10)
    session.deliver(5, frame_of(5))
    session.deliver(11, frame_of(11))
    assert outlet.writes == [frame_of(11)]
    session.synced(3)  # an older sync never moves it back
    session.deliver(12, frame_of(12))
    assert outlet.writes == [frame_of(11), frame_of(12)]
