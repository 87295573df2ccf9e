"""A chat node: wires storage, services and transports together and runs their lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from clusterchat.clock import now_ms
from clusterchat.config import NodeConfig
from clusterchat.errors import BadRequest, Unavailable
from clusterchat.protocol.events import inbox_message_frame
from clusterchat.protocol.requests import (
    Ack,
    CreateGroup,
    CreateRoom,
    FriendAccept,
    FriendReject,
    FriendRequest,
    Friends,
    Groups,
    GroupSend,
    History,
    JoinGroup,
    JoinRoom,
    LeaveGroup,
    LeaveRoom,
    Login,
    Logout,
    Lookup,
    Ping,
    Register,
    Request,
    RoomSend,
    Send,
    Sync,
    Unfriend,
)  # fmt: skip
from clusterchat.services.accounts import AccountService, make_hasher
from clusterchat.services.hub import Hub
from clusterchat.services.messages import MessageService
from clusterchat.services.rooms import RoomService
from clusterchat.services.sessions import SessionService
from clusterchat.services.social import FriendService, GroupService
from clusterchat.session import Session
from clusterchat.storage.accounts import TokenStore, UserStore
from clusterchat.storage.engine import Database, async_url, redact
from clusterchat.storage.inbox import InboxMessage, MessageStore, MessageWriter, StoredMessage
from clusterchat.storage.social import FriendStore, GroupStore
from clusterchat.transport.tcp import start_tcp
from clusterchat.transport.websocket import start_websocket

if TYPE_CHECKING:
    from clusterchat.cluster.link import ClusterLink
    from clusterchat.cluster.rooms import RoomPlacement

log = logging.getLogger(__name__)


class ChatNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.connections: set[Session] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._stopping = asyncio.Event()
        self.name = ""
        self.tcp_address: tuple[str, int] = ("", 0)
        self.ws_address: tuple[str, int] = ("", 0)
        self.cluster: ClusterLink | None = None
        self.placement: RoomPlacement | None = None

    # ---- wiring -----------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        clustered = config.redis_url is not None
        if clustered:
            _check_cluster_config(config)
        self.db = Database(config.db_url, pool_size=config.db_pool_size)
        log.info("opening database %s", redact(config.db_url))
        try:
            await self.db.upgrade()
        except Exception as exc:
            await self.db.close()
            raise RuntimeError(f"cannot open the database {redact(config.db_url)}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
        if clustered:
            from clusterchat.cluster.hub import ClusterHub
            from clusterchat.cluster.rooms import RoomPlacement

            self.hub: Hub = ClusterHub(self.spawn)
            self.placement = RoomPlacement(self.spawn)
        else:
            self.hub = Hub()
        users, tokens = UserStore(self.db), TokenStore(self.db)
        friend_store, group_store = FriendStore(self.db), GroupStore(self.db)
        self.writer = MessageWriter(self.db)
        await self.writer.open()
        self.messages = MessageStore(self.db, self.writer)
        self.writer.listeners.append(self.hub.on_commit)
        self.accounts = AccountService(users, tokens, make_hasher(config.argon2_memory_kib, config.argon2_time_cost),
                                       self.executor, config.token_ttl)
        self.friends = FriendService(friend_store, self.accounts, self.hub)
        self.groups = GroupService(group_store, self.hub)
        self.chat = MessageService(self.writer, self.messages, self.groups, self.accounts)
        self.sessions = SessionService(self.accounts, self.friends, friend_store, self.groups, self.messages,
                                       self.writer, self.hub, reject_duplicates=config.duplicate_login == "reject")
        self.sessions.on_end.append(lambda _session: self.writer.save_acks())
        self.hub.group_listeners.append(self.groups.forget)
        self._writer_task = self.loop.create_task(self.writer.run(), name="message-writer")

        self.tcp_server = await start_tcp(self, config.host, config.port)
        self.ws_server = await start_websocket(self, config.host, config.ws_port)
        self.tcp_address = self.tcp_server.sockets[0].getsockname()[:2]
        self.ws_address = self.ws_server.sockets[0].getsockname()[:2]
        self.name = config.node_name(self.tcp_address[1])
        host = config.public_host
        self.rooms = RoomService({"host": host, "port": self.tcp_address[1],
                                  "ws_url": f"ws://{host}:{self.ws_address[1]}/ws"}, directory=self.placement)
        self.sessions.on_end.append(self._leave_rooms)
        self._sweeper = self.loop.create_task(self._sweep_idle(), name="idle-sweeper")
        self._janitor = self.loop.create_task(self._purge_tokens(), name="token-janitor")
        if clustered:
            await self._join_cluster()

    async def _join_cluster(self) -> None:
        from clusterchat.cluster.hub import ClusterHub
        from clusterchat.cluster.link import ClusterLink

        assert isinstance(self.hub, ClusterHub) and self.placement is not None
        self.hub.kick = self.sessions.kick
        self.cluster = ClusterLink(self, self.hub, self.placement, self.messages)
        try:
            await self.cluster.start()
        except BaseException:
            self.tcp_server.close()
            self.ws_server.close()
            self._sweeper.cancel()
            self._janitor.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer_task, 5)
            await self.db.close()
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise

    def ready_line(self) -> str:
        return (f"clusterchat node {self.name} listening on tcp://{self.tcp_address[0]}:{self.tcp_address[1]} "
                f"ws://{self.ws_address[0]}:{self.ws_address[1]}/ws")

    async def stop(self) -> None:
        """Stop accepting, close connections (friends see them go), flush, close backends."""
        log.info("node %s stopping: %d connections", self.name, len(self.connections))
        self.tcp_server.close()
        self.ws_server.close(close_connections=False)
        self._sweeper.cancel()
        self._janitor.cancel()
        # Let replies to requests already being written go out first.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer_task, 10)
        if self.cluster is not None:
            self.cluster.begin_stop()
        for session in list(self.connections):
            self.sessions.end(session)
        for session in list(self.connections):
            session.close()
        if self.cluster is not None:
            await self.cluster.stop()  # other nodes' users see ours go offline
        self.rooms.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws_server.wait_closed(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.tcp_server.wait_closed(), 2)
        await self.db.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("node %s stopped", self.name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sweep_idle(self) -> None:
        timeout = self.config.idle_timeout
        if timeout <= 0:
            return
        period = min(max(timeout / 4, 0.2), 5.0)
        while True:
            await asyncio.sleep(period)
            deadline = self.loop.time() - timeout
            idle = [s for s in self.connections if s.last_frame < deadline]
            for session in idle:
                log.info("closing %r: idle for %.0f s", session, timeout)
                session.close()

    async def _purge_tokens(self) -> None:
        while True:
            await asyncio.sleep(3600)
            with contextlib.suppress(Exception):
                await self.accounts._tokens.purge_expired()

    # ---- sessions ---------------------------------------------------------------

    def session_ended(self, session: Session) -> None:
        self.sessions.end(session)

    def _leave_rooms(self, session: Session) -> None:
        if session.user_id is not None and self.rooms.rooms:
            self.rooms.leave_all(session.user_id, session.user_name, session)

    def message_frame(self, message: InboxMessage) -> bytes:
        return inbox_message_frame(message)

    def reply_body(self, op: str, result: Any) -> dict[str, Any] | None:
        if isinstance(result, StoredMessage):
            return {"id": result.id, "ts": result.ts}
        return result  # type: ignore[no-any-return]

    # ---- dispatch -----------------------------------------------------------------

    def dispatch(self, s: Session, req: Request) -> Any:
        """Run one request: a reply body now, or a future/coroutine of one."""
        match req:
            case Send():
                return self.chat.send(s, req)
            case GroupSend():
                return self.chat.group_send(s, req)
            case Ack(seq=seq):
                self.chat.ack(s, seq)
                return None
            case Ping():
                return {"ts": now_ms()}
            case Register(name=name, password=password):
                return self._register(name, password)
            case Login():
                return self.sessions.login(s, req)
            case Logout():
                return self.sessions.logout(s)
            case Lookup(name=name):
                return self.accounts.lookup(name)
            case FriendRequest(user_id=uid, note=note):
                return self.friends.request(s, uid, note)
            case FriendAccept(user_id=uid):
                return self.friends.accept(s, uid)
            case FriendReject(user_id=uid):
                return self.friends.reject(s, uid)
            case Unfriend(user_id=uid):
                return self.friends.unfriend(s, uid)
            case Friends():
                return self._friends(s)
            case CreateGroup(name=name, desc=desc):
                return self.groups.create(s, name, desc)
            case JoinGroup(group_id=gid):
                return self.groups.join(s, gid)
            case LeaveGroup(group_id=gid):
                return self.groups.leave(s, gid)
            case Groups():
                return self._groups(s)
            case Sync(after=after, limit=limit):
                return self.chat.sync(s, after, limit)
            case History():
                if (req.with_ is None) == (req.group_id is None):
                    raise BadRequest("field `with`: give exactly one of `with` and `group_id`")
                return self.chat.history(s, req)
            case CreateRoom(name=name):
                if self.placement is not None:
                    return self.placement.create(name)
                return self.rooms.create(name)
            case JoinRoom(room_id=rid):
                return self.rooms.join(s, rid)
            case RoomSend(room_id=rid, text=text):
                return self.rooms.send(s, rid, text)
            case LeaveRoom(room_id=rid):
                return self.rooms.leave(s, rid)
        raise Unavailable(f"{type(req).__name__} is not served here")  # pragma: no cover

    async def _register(self, name: str, password: str) -> dict[str, Any]:
        return {"user_id": await self.accounts.register(name, password)}

    async def _friends(self, s: Session) -> dict[str, Any]:
        assert s.user_id is not None
        return {"friends": await self.friends.friend_list(s.user_id)}

    async def _groups(self, s: Session) -> dict[str, Any]:
        assert s.user_id is not None
        return {"groups": await self.groups.groups_of(s.user_id)}


def _check_cluster_config(config: NodeConfig) -> None:
    if async_url(config.db_url).get_backend_name() == "sqlite":
        raise RuntimeError("--redis (cluster mode) needs a database every node shares: give --db a MariaDB/MySQL "
                           "or PostgreSQL URL (SQLite lives in one node's files)")
    if config.name is not None and (not config.name or any(c.isspace() for c in config.name)):
        raise RuntimeError("--name must be a word without spaces in cluster mode")


async def serve(config: NodeConfig) -> int:
    """Run a node until SIGTERM or SIGINT; the exit code."""
    node = ChatNode(config)
    try:
        await node.start()
    except Exception as exc:
        log.error("%s", exc)
        print(f"clusterchat: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        node.loop.add_signal_handler(sig, stop.set)
    # Everything allocated so far lives as long as the node: keep the collector off it, and
    # let it run less often (a chat node allocates many short-lived objects per message).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    print(node.ready_line(), flush=True)
    log.info("%s", node.ready_line())
    await stop.wait()
    await node.stop()
    return 0
