"""The hub of a cluster node: events for users here are written at once, the rest leave on the bus.

Services keep calling the `Hub` methods they know; this subclass adds the other
nodes. A node never knows where another node's users are: events for users not
connected here are broadcast once on `cc:deliver`, and every node delivers to the
users it hosts (for messages: the commit batch once, with the (user, seq) of every
delivery to a user not on this node). Logins claim the user in the online map
(`presence.OnlineMap`) so that a user has one session in the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from clusterchat.cluster.bus import Bus
from clusterchat.cluster.codec import (
    Batch,
    FriendChanged,
    GroupChanged,
    Kick,
    Payload,
    Presence,
    Push,
    UsersGone,
    WireMessage,
)  # fmt: skip
from clusterchat.cluster.presence import OnlineMap, Refused
from clusterchat.cluster.registry import Registry
from clusterchat.errors import AlreadyLoggedIn, Unavailable
from clusterchat.protocol.events import message_frame, message_tail, presence
from clusterchat.services.hub import Hub
from clusterchat.storage.inbox import OutgoingMessage

if TYPE_CHECKING:
    from clusterchat.session import Session

log = logging.getLogger(__name__)

CONFIRM_WITHIN = 1.0  # seconds a membership change waits for Redis to take its event


class _KeyedLocks:
    """One asyncio.Lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class ClusterHub(Hub):
    def __init__(self, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Future[Any]]) -> None:
        super().__init__()
        self._spawn = spawn
        self._bus: Bus | None = None
        self._online: OnlineMap | None = None
        self._registry: Registry | None = None
        self._node = ""
        self._deliver = ""
        self._claim_prefix = secrets.token_hex(4)  # claims of an earlier run of this node never match
        self._claims = itertools.count(1)
        self._login_locks = _KeyedLocks()
        self.stopping = False
        self.dirty = False  # an online-map update failed: reconcile at the next heartbeat
        # Closes a session that logged in elsewhere (SessionService.kick, wired by the node).
        self.kick: Callable[[Session], None] = lambda session: None

    def bind(self, bus: Bus, online: OnlineMap, registry: Registry) -> None:
        self._bus, self._online, self._registry = bus, online, registry
        self._node = bus.names.node
        self._deliver = bus.names.deliver

    def _publish(self, payload: Payload, *, confirm: bool = False) -> asyncio.Future[int] | None:
        if self._bus is None or self.stopping:
            return None
        return self._bus.publish(self._deliver, payload, confirm=confirm)

    async def _confirmed(self, future: asyncio.Future[int] | None) -> None:
        """Wait (bounded) until Redis took an event, so a client's next request on another node sees it."""
        if future is not None and self._bus is not None and self._bus.ready:
            await asyncio.wait((future,), timeout=CONFIRM_WITHIN)

    # ---- logins --------------------------------------------------------------------

    def login_lock(self, user_id: int) -> contextlib.AbstractAsyncContextManager[object]:
        return self._login_locks.hold(user_id)

    async def claim(self, session: Session, user_id: int, *, reject: bool) -> None:
        if self._bus is None or self._online is None:
            raise Unavailable("this node is not in the cluster yet; retry later")
        self._bus.require_ready()
        claim = f"{self._claim_prefix}.{next(self._claims)}"
        try:
            previous = await self._online.claim(user_id, claim, refuse=reject)
        except Refused:
            raise AlreadyLoggedIn("you are logged in on another node") from None
        session.claim = claim
        if previous is not None and previous[0] != self._node:
            # The older session is on another node (maybe a dead one, then nobody hears this).
            self._bus.publish(self._bus.names.node_channel(previous[0]), Kick(user_id, previous[1]))

    def session_gone(self, session: Session, user_id: int, friends: Iterable[int], *, announce: bool) -> None:
        claim = session.claim
        if self.stopping or claim is None or self._online is None:
            # Stopping: friends here are told now; the others by the node's farewell.
            if announce:
                self._push_local(friends, presence(user_id, False))
            return
        self._spawn(self._release(user_id, claim, list(friends) if announce else [], announce))

    async def _release(self, user_id: int, claim: str, friends: list[int], announce: bool) -> None:
        assert self._online is not None
        try:
            held = await self._online.release(user_id, claim)
        except Unavailable:
            held = 0  # cleaned up by the reconcile once Redis is back
            self.dirty = True
        # -1: the user logged in elsewhere meanwhile; it is online there, say nothing.
        if announce and held >= 0:
            self.announce_presence(user_id, False, friends)

    # ---- who is online ------------------------------------------------------------

    async def online_among(self, user_ids: Iterable[int]) -> set[int]:
        sessions = self.sessions
        wanted = set(user_ids)
        online = {u for u in wanted if u in sessions}
        rest = wanted - online
        if not rest or self._online is None or self._registry is None or self._bus is None or not self._bus.ready:
            return online
        try:
            holders = await self._online.holders(rest)
        except Unavailable:
            return online  # what this node knows is the best answer while Redis is away
        registry = self._registry
        if any(not registry.is_live(node) for node in holders.values()):
            with contextlib.suppress(Unavailable):
                await registry.fresh()  # a node that joined since our last heartbeat?
        online.update(u for u, node in holders.items() if node != self._node and registry.is_live(node))
        return online

    # ---- events out ---------------------------------------------------------------

    def _push_local(self, user_ids: Iterable[int], frame: bytes) -> None:
        Hub.push_many(self, user_ids, frame)

    def _split(self, user_ids: Iterable[int]) -> tuple[list[Session], list[int]]:
        sessions = self.sessions
        here: list[Session] = []
        elsewhere: list[int] = []
        for user_id in user_ids:
            session = sessions.get(user_id)
            if session is None:
                elsewhere.append(user_id)
            else:
                here.append(session)
        return here, elsewhere

    def push(self, user_id: int, frame: bytes) -> None:
        session = self.sessions.get(user_id)
        if session is not None:
            session.write(frame)
        else:
            self._publish(Push([user_id], frame))

    def push_many(self, user_ids: Iterable[int], frame: bytes) -> None:
        here, elsewhere = self._split(user_ids)
        for session in here:
            session.write(frame)
        if elsewhere:
            self._publish(Push(elsewhere, frame))

    def announce_presence(self, user_id: int, online: bool, friends: Iterable[int]) -> None:
        frame = presence(user_id, online)
        here, elsewhere = self._split(friends)
        for session in here:
            session.write(frame)
        if elsewhere:
            self._publish(Presence(user_id, online, elsewhere))

    async def friend_changed(self, user_id: int, friend_id: int, *, added: bool, frame: bytes) -> None:
        if user_id in self.sessions:
            await super().friend_changed(user_id, friend_id, added=added, frame=frame)
            return
        await self._confirmed(self._publish(FriendChanged(user_id, friend_id, added, frame), confirm=True))

    async def group_changed(self, group_id: int, notify: Iterable[int], frame: bytes) -> None:
        here, elsewhere = self._split(notify)
        for session in here:
            session.write(frame)
        # Every node drops its cached members, even with no member to tell there.
        await self._confirmed(self._publish(GroupChanged(group_id, elsewhere, frame), confirm=True))

    def on_commit(self, stored: Sequence[OutgoingMessage]) -> None:
        """Deliver committed messages here; one publish carries the deliveries to everyone else."""
        sessions = self.sessions
        wire: list[WireMessage] = []
        for message in stored:
            result = message.stored
            if result is None:
                continue
            tail = None
            elsewhere: list[int] = []
            for user_id, seq in result.deliveries:
                session = sessions.get(user_id)
                if session is None:
                    elsewhere.append(user_id)
                    elsewhere.append(seq)
                    continue
                if tail is None:
                    tail = message_tail(result.id, message.sender_id, message.sender_name, message.to_user,
                                        message.group_id, message.text, result.ts)
                session.deliver(seq, message_frame(seq, tail))
            if elsewhere:
                wire.append(WireMessage(result.id, message.sender_id, message.sender_name, message.to_user,
                                        message.group_id, message.text, result.ts, elsewhere))
        if wire:
            self._publish(Batch(wire))

    # ---- events in ----------------------------------------------------------------

    def on_payload(self, origin: str, payload: Payload) -> None:
        match payload:
            case Batch(messages=messages):
                self._deliver_batch(messages)
            case Presence(user_id=user_id, online=online, friends=friends):
                self._push_local(friends, presence(user_id, online))
            case Push(user_ids=user_ids, frame=frame):
                self._push_local(user_ids, frame)
            case FriendChanged(user_id=user_id, friend_id=friend_id, added=added, frame=frame):
                session = self.sessions.get(user_id)
                if session is not None:
                    if added:
                        session.friends.add(friend_id)
                    else:
                        session.friends.discard(friend_id)
                    session.write(frame)
            case GroupChanged(group_id=group_id, notify=notify, frame=frame):
                for listener in self.group_listeners:
                    listener(group_id)
                self._push_local(notify, frame)
            case UsersGone(user_ids=user_ids):
                self.users_gone(user_ids)
            case Kick(user_id=user_id, claim=claim):
                session = self.sessions.get(user_id)
                if session is not None and session.claim == claim:
                    self.kick(session)

    def _deliver_batch(self, messages: list[WireMessage]) -> None:
        sessions = self.sessions
        for m in messages:
            deliveries = m.deliveries
            tail = None
            for i in range(0, len(deliveries), 2):
                session = sessions.get(deliveries[i])
                if session is None:
                    continue
                if tail is None:
                    tail = message_tail(m.id, m.sender_id, m.sender_name, m.to_user, m.group_id, m.text, m.ts)
                seq = deliveries[i + 1]
                session.deliver(seq, message_frame(seq, tail))

    def users_gone(self, user_ids: Iterable[int]) -> None:
        """Users of a dead or stopped node went offline: tell their friends connected here."""
        gone = set(user_ids)
        if not gone:
            return
        for session in list(self.sessions.values()):
            friends = session.friends
            common = gone & friends if len(friends) < len(gone) else friends & gone
            for user_id in common:
                session.write(presence(user_id, False))

    # ---- after an outage ------------------------------------------------------------

    async def reconcile(self, *, revive: bool = True) -> None:
        """Make the online map agree with the sessions here again (after Redis was away or
        lost its data, or this node was taken for dead). With `revive`, users missing from
        the map are announced online again (their friends were told they went offline)."""
        if self._online is None or self._bus is None:
            return
        self.dirty = False
        online, names = self._online, self._bus.names
        try:
            mine = await online.mine()
            stale = [(u, c) for u, c in mine.items() if (s := self.sessions.get(u)) is None or s.claim != c]
            gone = [u for u, c in stale if await online.release(u, c) == 1]
            missing = [(u, s.claim) for u, s in self.sessions.items()
                       if s.claim is not None and mine.get(u) != s.claim]
            results = await online.reclaim(missing)
        except Unavailable:
            self.dirty = True
            raise
        if gone:
            log.info("dropped %d stale online entries", len(gone))
            self.users_gone(gone)
            self._publish(UsersGone(names.node, gone))
        revived = 0
        for (user_id, claimed, previous), (_, claim) in zip(results, missing, strict=True):
            session = self.sessions.get(user_id)
            if session is None or session.claim != claim:
                continue  # ended meanwhile; its own release cleans up
            if not claimed:
                # Logged in on another live node while we could not see: that login wins.
                self.kick(session)
            elif revive and (previous is None or previous[0] != self._node):
                # Friends were told this user went offline (this node was reaped).
                revived += 1
                self.announce_presence(user_id, True, session.friends)
        if missing:
            log.info("re-claimed %d of %d sessions in the online map (%d shown online again)",
                     sum(1 for _, ok, _ in results if ok), len(missing), revived)
