"""What the terminal client shows: replies, events and errors as lines of text, with no I/O.

`View` keeps a `Directory` of what the logged-in user knows (friends, groups, friend requests,
names seen) up to date from replies and events, so that every line can say "bob (2)" rather
than "user 2". Message text is shown as sent; only control characters, which would let a
sender drive the reader's terminal, are replaced by visible symbols.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from clusterchat.terminal.commands import (
    HELP,
    Accept,
    AddFriend,
    AddGroup,
    Chat,
    Command,
    CreateGroup,
    GroupChat,
    GroupHistory,
    History,
    LeaveGroup,
    Login,
    Lookup,
    Register,
    Reject,
    Unfriend,
    UserRef,
)

RULE_WIDTH = 56

_CONTROL_PICTURES = {c: chr(0x2400 + c) for c in range(0x20)} | {0x7F: "\u2421"}
_CONTROL_PICTURES.update({c: "\ufffd" for c in range(0x80, 0xA0)})
del _CONTROL_PICTURES[ord("\n")], _CONTROL_PICTURES[ord("\t")]


def safe_text(text: str) -> str:
    """`text` exactly, except control characters (but newline and tab) shown as symbols (ESC as ␛)."""
    return text.translate(_CONTROL_PICTURES)


def format_ts(ts_ms: int | float | None) -> str:
    """A protocol timestamp (ms since the epoch) in local time, like the seed client: 2025-11-21 04:53:20."""
    if ts_ms is None:
        return "----------- --:--:--"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts_ms / 1000))


def rule(title: str = "", char: str = "-") -> str:
    if not title:
        return char * RULE_WIDTH
    side = max(2, (RULE_WIDTH - len(title)) // 2)
    return f"{char * side}{title}{char * max(2, RULE_WIDTH - side - len(title))}"


@dataclass
class Directory:
    """What the logged-in user knows of the people and groups around them."""

    me: dict[str, Any] | None = None
    friends: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> {id, name, online}
    groups: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> group as in the login reply
    requests: dict[int, dict[str, Any]] = field(default_factory=dict)  # asker's id -> {from, note, ts}
    names: dict[int, str] = field(default_factory=dict)  # every user id -> name seen so far

    @property
    def my_id(self) -> int | None:
        return self.me["id"] if self.me else None

    def learn(self, user: dict[str, Any] | None) -> None:
        if user and isinstance(user.get("id"), int) and isinstance(user.get("name"), str):
            self.names[user["id"]] = user["name"]

    def set_friends(self, friends: list[dict[str, Any]]) -> None:
        self.friends = {f["id"]: dict(f) for f in friends}
        for f in friends:
            self.learn(f)

    def set_groups(self, groups: list[dict[str, Any]]) -> None:
        self.groups = {}
        for g in groups:
            self.add_group(g)

    def add_group(self, group: dict[str, Any]) -> None:
        self.groups[group["id"]] = group
        for member in group.get("members") or ():
            self.learn(member)

    def user_id(self, ref: UserRef) -> int | None:
        """The id of a user given by id or name, if known here (names of friends, askers, seen users)."""
        if isinstance(ref, int):
            return ref
        if self.me and self.me.get("name") == ref:
            return int(self.me["id"])
        for user_id, name in self.names.items():
            if name == ref:
                return user_id
        return None

    def who(self, ref: UserRef | None) -> str:
        """A user for a sentence: "bob (2)" when the name is known, else "user 2"."""
        if ref is None:
            return "someone"
        if isinstance(ref, str):
            user_id = self.user_id(ref)
            return ref if user_id is None else f"{ref} ({user_id})"
        name = self.names.get(ref)
        return f"{name} ({ref})" if name else f"user {ref}"

    def group_label(self, group_id: int) -> str:
        group = self.groups.get(group_id)
        return f"[{group_id}]{group['name']}" if group else f"[{group_id}]"


class View:
    """Turns replies and events into lines of text, keeping the `Directory` up to date."""

    def __init__(self) -> None:
        self.dir = Directory()

    @property
    def logged_in(self) -> bool:
        return self.dir.me is not None

    def reset(self) -> None:
        self.dir = Directory()

    # ------------------------------------------------------------------ screens

    @staticmethod
    def menu() -> list[str]:
        return [rule(char="="), "1. login", "2. register", "3. quit", rule(char="=")]

    @staticmethod
    def help() -> list[str]:
        width = max(len(usage) for usage, _ in HELP)
        return ["commands:", *(f"  {usage.ljust(width)}  {what}" for usage, what in HELP)]

    def login(self, reply: dict[str, Any]) -> list[str]:
        """Take in a login reply; the welcome screen: who, friends, groups, requests, offline messages."""
        d = self.dir
        d.me = dict(reply["user"])
        d.learn(d.me)
        d.set_friends(reply.get("friends") or [])
        d.set_groups(reply.get("groups") or [])
        d.requests = {}
        for request in reply.get("friend_requests") or []:
            d.learn(request.get("from"))
            d.requests[request["from"]["id"]] = request
        offline = reply.get("offline") or []
        for m in offline:
            d.learn(m.get("from"))
        lines = [rule(char="="), f"current login user => id:{d.me['id']} name:{d.me['name']}"]
        lines += [rule("friend list"), *self._friend_lines()]
        lines += [rule("group list"), *self._group_lines()]
        lines += [rule("friend requests"), *self._request_lines()]
        lines.append(rule("offline messages"))
        lines += [line for m in offline for line in self.message(m)] or ["(none)"]
        if reply.get("more"):
            lines.append("(more offline messages follow)")
        lines += [rule(char="="), "type help for the commands"]
        return lines

    def friends(self, friends: list[dict[str, Any]]) -> list[str]:
        self.dir.set_friends(friends)
        return [rule("friend list"), *self._friend_lines()]

    def groups(self, groups: list[dict[str, Any]]) -> list[str]:
        self.dir.set_groups(groups)
        return [rule("group list"), *self._group_lines()]

    def history(self, title: str, messages: list[dict[str, Any]]) -> list[str]:
        for m in messages:
            self.dir.learn(m.get("from"))
        if not messages:
            return [f"no messages {title} yet"]
        return [rule(f" history {title} "), *(line for m in messages for line in self.message(m)), rule()]

    def _friend_lines(self) -> list[str]:
        friends = sorted(self.dir.friends.values(), key=lambda f: (not f.get("online"), f["name"]))
        if not friends:
            return ["(no friends yet: addfriend:USERID)"]
        return [f"[{f['id']}] {f['name']}  {'online' if f.get('online') else 'offline'}" for f in friends]

    def _group_lines(self) -> list[str]:
        if not self.dir.groups:
            return ["(no groups yet: creategroup:NAME:DESC or addgroup:GROUPID)"]
        lines = []
        for g in sorted(self.dir.groups.values(), key=lambda g: g["id"]):
            desc = f": {safe_text(g['desc'])}" if g.get("desc") else ""
            lines.append(f"[{g['id']}] {g['name']}{desc}")
            for m in g.get("members") or ():
                online = "online" if m.get("online") else "offline"
                lines.append(f"    [{m['id']}] {m['name']}  {m.get('role', 'member')}  {online}")
        return lines

    def _request_lines(self) -> list[str]:
        if not self.dir.requests:
            return ["(none)"]
        return [self._request_line(r) for r in self.dir.requests.values()]

    def _request_line(self, request: dict[str, Any]) -> str:
        asker = request["from"]["id"]
        note = f': "{safe_text(request["note"])}"' if request.get("note") else ""
        return f"{self.dir.who(asker)} asks to be your friend{note} (accept:{asker} or reject:{asker})"

    # ------------------------------------------------------------------ messages and events

    def message(self, m: dict[str, Any]) -> list[str]:
        """A message, as in the seed client: `TIME [ID]NAME said: TEXT`, with `group [ID]NAME: ` in front."""
        sender = m.get("from") or {}
        self.dir.learn(sender)
        said = f"{format_ts(m.get('ts'))} [{sender.get('id')}]{sender.get('name')} said: {safe_text(m.get('text', ''))}"
        if m.get("group_id") is not None:
            said = f"group {self.dir.group_label(m['group_id'])}: {said}"
        elif m.get("to") is not None and m.get("to") != self.dir.my_id and sender.get("id") == self.dir.my_id:
            said = f"{said}  (to {self.dir.who(m['to'])})"
        return said.split("\n")

    def event(self, ev: dict[str, Any]) -> list[str]:
        """Take in a pushed event; the lines to show (none for events the user needn't see)."""
        d = self.dir
        match ev.get("event"):
            case "message":
                return self.message(ev)
            case "friend_request":
                d.learn(ev.get("from"))
                d.requests[ev["from"]["id"]] = ev
                return [self._request_line(ev)]
            case "friend_added":
                friend = ev["friend"]
                d.learn(friend)
                d.friends[friend["id"]] = dict(friend)
                d.requests.pop(friend["id"], None)
                return [f"you and {d.who(friend['id'])} are now friends"]
            case "friend_removed":
                user_id = ev["user_id"]
                d.friends.pop(user_id, None)
                return [f"{d.who(user_id)} removed you from their friends"]
            case "presence":
                user_id, online = ev["user_id"], bool(ev.get("online"))
                if user_id in d.friends:
                    d.friends[user_id]["online"] = online
                for g in d.groups.values():
                    for member in g.get("members") or ():
                        if member.get("id") == user_id:
                            member["online"] = online
                return [f"{d.who(user_id)} {'is online' if online else 'went offline'}"]
            case "group_member":
                return self._group_member(ev)
            case "kicked":
                d.me = None
                return ["you logged in somewhere else, so this session was closed: log in again to come back here"]
            case "room_message":
                d.learn(ev.get("from"))
                sender = ev.get("from") or {}
                return (f"room {ev.get('room_id')}: {format_ts(ev.get('ts'))} [{sender.get('id')}]{sender.get('name')}"
                        f" said: {safe_text(ev.get('text', ''))}").split("\n")
            case "room_member":
                d.learn(ev.get("user"))
                user = ev.get("user") or {}
                verb = "joined" if ev.get("joined") else "left"
                return [f"{d.who(user.get('id'))} {verb} room {ev.get('room_id')}"]
            case "error":
                error = ev.get("error") or {}
                return [f"the server could not read what this client sent: {error.get('message') or error.get('code')}"]
            case "disconnected":
                if not self.logged_in:
                    return ["connection lost: it is opened again when you log in or register"]
                return ["connection lost, reconnecting…"]
            case "reconnected":
                return ["reconnected"]
        return []

    def _group_member(self, ev: dict[str, Any]) -> list[str]:
        d = self.dir
        user, group_id, joined = ev["user"], ev["group_id"], bool(ev.get("joined"))
        d.learn(user)
        group = d.groups.get(group_id)
        if group is not None:
            members = [m for m in group.get("members") or () if m.get("id") != user["id"]]
            if joined:
                members.append({**user, "role": "member", "online": True})
            group["members"] = members
        verb = "joined" if joined else "left"
        return [f"{d.who(user['id'])} {verb} group {d.group_label(group_id)}"]

    # ------------------------------------------------------------------ errors

    def error(self, code: str, message: str | None, command: Command | Login | Register | None = None,
              target: int | None = None) -> str:
        """An error reply as a sentence; `target` is the user id the command was about, once resolved."""
        d = self.dir
        user: UserRef | None = target
        if user is None and isinstance(command, Chat | AddFriend | Accept | Reject | Unfriend | History):
            user = _user_of(command)
        who = d.who(user)
        group_id = command.group_id if isinstance(command, AddGroup | LeaveGroup | GroupChat | GroupHistory) else None
        match code:
            case "not_friends":
                if isinstance(command, Unfriend):
                    return f"{who} is not your friend"
                return f"{d.who(user)} is not your friend yet: send addfriend:{user} first"
            case "already_friends":
                return f"{who} is already your friend"
            case "no_such_user":
                if isinstance(command, Lookup):
                    return f"there is no user named {command.name}"
                if isinstance(user, str):
                    return f"there is no user named {user}"
                return f"there is no user with id {user}" if user is not None else "there is no such user"
            case "no_such_group":
                return f"there is no group {group_id}: groups lists yours" if group_id else "there is no such group"
            case "not_member":
                return f"you are not a member of group {group_id}: send addgroup:{group_id} first"
            case "bad_credentials":
                return "wrong name or password"
            case "name_taken":
                name = command.name if isinstance(command, Register) else "that name"
                return f"the name {name} is taken: choose another"
            case "already_logged_in":
                if isinstance(command, Login):
                    return "this account is logged in elsewhere, and the server refuses a second login"
                return "you are already logged in"
            case "not_logged_in":
                return "you are not logged in: log in first"
            case "rate_limited":
                return "you are sending too fast: wait a moment and try again"
            case "unavailable":
                return "the server cannot do that right now (a backend is down): nothing was changed, try again later"
            case "internal":
                return "the server failed to do that (an internal error): nothing was changed"
            case "bad_request" if isinstance(command, Accept):
                return f"{who} has not asked to be your friend"
            case "bad_request" if isinstance(command, AddFriend) and user == d.my_id:
                return "you cannot befriend yourself"
            case "bad_request" if isinstance(command, CreateGroup):
                return f"the server refused that group: {message}"
            case "bad_request":
                return f"the server refused that: {message}"
        return message or f"the server answered {code}"


def _user_of(command: Chat | AddFriend | Accept | Reject | Unfriend | History) -> UserRef:
    match command:
        case Chat():
            return command.to
        case AddFriend() | Accept() | Reject() | Unfriend():
            return command.user
        case History():
            return command.with_
