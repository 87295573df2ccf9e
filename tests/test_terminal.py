"""The terminal client: command parsing and rendering without a terminal, then end to end.

The end-to-end tests run `python -m clusterchat client` in a pseudo-terminal (pexpect) against a
real node subprocess, and type into it as a user would.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from clusterchat.terminal.commands import (
    HELP,
    MAX_TEXT,
    Accept,
    AddFriend,
    AddGroup,
    Chat,
    CommandError,
    CreateGroup,
    Friends,
    GroupChat,
    GroupHistory,
    Groups,
    Help,
    History,
    LeaveGroup,
    Login,
    Logout,
    Lookup,
    MenuChoice,
    Quit,
    Register,
    Reject,
    Unfriend,
    parse_command,
    parse_menu_choice,
)
from clusterchat.terminal.view import View, format_ts, safe_text
from support.node import NodeProcess

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("line", "command"), [
    ("help", Help()),
    ("chat:2:hello", Chat(2, "hello")),
    ("chat:bob:hello", Chat("bob", "hello")),
    ("  CHAT : 2 :hello", Chat(2, "hello")),
    ("addfriend:2", AddFriend(2)),
    ("addfriend:bob:hi, it's me: alice", AddFriend("bob", "hi, it's me: alice")),
    ("creategroup:team:our team: the best", CreateGroup("team", "our team: the best")),
    ("creategroup:team", CreateGroup("team")),
    ("addgroup:9", AddGroup(9)),
    ("joingroup:9", AddGroup(9)),
    ("groupchat:9:hi all", GroupChat(9, "hi all")),
    ("loginout", Logout()),
    ("logout", Logout()),
    ("accept:3", Accept(3)),
    ("reject:carol", Reject("carol")),
    ("unfriend:2", Unfriend(2)),
    ("friends", Friends()),
    ("groups", Groups()),
    ("leavegroup:9", LeaveGroup(9)),
    ("history:2", History(2)),
    ("history:bob:5", History("bob", 5)),
    ("grouphistory:9:100", GroupHistory(9, 100)),
    ("lookup:bob", Lookup("bob")),
    ("quit", Quit()),
    ("exit", Quit()),
])
def test_parse_command(line: str, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize("text", [
    "a:b::c", " leading and trailing spaces ", r"back\slash \n \t \x1b stay as typed", "<b>not html</b>",
    "{\"op\": \"send\"}", "ünïcødé 你好 🙂", ":", " ",
])
def test_message_text_is_kept_exactly(text: str) -> None:
    assert parse_command(f"chat:2:{text}") == Chat(2, text)
    assert parse_command(f"groupchat:7:{text}") == GroupChat(7, text)


def test_blank_lines_are_nothing() -> None:
    assert parse_command("") is None
    assert parse_command("   \t ") is None


@pytest.mark.parametrize(("line", "sentence"), [
    ("chat:2", "usage: chat:FRIENDID:TEXT"),
    ("chat", "usage: chat:FRIENDID:TEXT"),
    ("chat::hi", "usage: chat:FRIENDID:TEXT"),
    ("chat:2:", "the message is empty"),
    ("chat:0:hi", "0 is not a valid id"),
    (f"chat:{2**53}:hi", "is not a valid id"),
    ("chat:bo b:hi", "is neither a user id nor a user's name"),
    ("addgroup:team", "a group is given by its number, not 'team'"),
    ("groupchat:team:hi", "a group is given by its number"),
    ("friends:all", "friends takes nothing after it"),
    ("history:2:500", "the number of messages is 1 to 100, not '500'"),
    ("history:2:x", "the number of messages is 1 to 100"),
    ("creategroup: :desc", "usage: creategroup:NAME[:DESC]"),
    ("lookup:", "usage: lookup:NAME"),
    ("frobnicate:2", "there is no command 'frobnicate': type help for the list"),
    ("hello there", "there is no command 'hello there'"),
])
def test_parse_errors_are_sentences(line: str, sentence: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert sentence in str(info.value)


def test_too_long_a_message_is_refused_before_sending() -> None:
    assert parse_command("chat:2:" + "x" * MAX_TEXT) == Chat(2, "x" * MAX_TEXT)
    with pytest.raises(CommandError, match=f"too long \\({MAX_TEXT + 1} characters; at most {MAX_TEXT}\\)"):
        parse_command("chat:2:" + "x" * (MAX_TEXT + 1))


def test_every_command_in_help_parses() -> None:
    """help and the parser agree: each usage line, filled in, is a command."""
    samples = {"FRIENDID": "2", "USERID": "3", "GROUPID": "9", "TEXT": "hi", "NAME": "team", "DESC": "d",
               "NOTE": "n", "N": "5"}
    for usage, _ in HELP:
        filled = re.sub(r"[A-Z]+", lambda m: samples[m.group(0)], usage)
        assert parse_command(filled.replace("[", "").replace("]", "")) is not None, usage
        assert parse_command(re.sub(r"\[.*\]", "", filled)) is not None, usage


def test_help_keeps_the_seed_commands() -> None:
    text = "\n".join(View.help())
    for usage in ("help", "chat:FRIENDID:TEXT", "addfriend:USERID", "creategroup:NAME", "addgroup:GROUPID",
                  "groupchat:GROUPID:TEXT", "loginout"):
        assert usage in text


@pytest.mark.parametrize(("line", "choice"), [
    ("1", MenuChoice.LOGIN), (" login ", MenuChoice.LOGIN), ("2", MenuChoice.REGISTER),
    ("Register", MenuChoice.REGISTER), ("3", MenuChoice.QUIT), ("quit", MenuChoice.QUIT), ("q", MenuChoice.QUIT),
    ("4", None), ("", None), ("log", None),
])
def test_parse_menu_choice(line: str, choice: MenuChoice | None) -> None:
    assert parse_menu_choice(line) is choice


# --------------------------------------------------------------------------- rendering

TS = 1763700000123
ALICE = {"id": 1, "name": "alice"}
BOB = {"id": 2, "name": "bob"}
CAROL = {"id": 3, "name": "carol"}


def login_reply(**overrides: object) -> dict[str, object]:
    reply: dict[str, object] = {
        "user": ALICE, "token": "t",
        "friends": [{"id": 2, "name": "bob", "online": True}, {"id": 4, "name": "dave", "online": False}],
        "groups": [{"id": 9, "name": "team", "desc": "the team", "role": "creator",
                    "members": [{"id": 1, "name": "alice", "role": "creator", "online": True},
                                {"id": 5, "name": "erin", "role": "member", "online": False}]}],
        "friend_requests": [{"from": CAROL, "note": "hi, it's carol", "ts": TS}],
        "offline": [{"event": "message", "seq": 1, "id": 100, "from": BOB, "to": 1, "text": "while you were out",
                     "ts": TS}],
        "more": False,
    }
    reply.update(overrides)
    return reply


def logged_in_view() -> View:
    view = View()
    view.login(login_reply())
    return view


def test_safe_text_shows_control_characters_as_symbols() -> None:
    assert safe_text("\x1b[2Jgone") == "\u241b[2Jgone"
    assert safe_text("a\rb\x07\x7f\x9b") == "a\u240db\u2407\u2421\ufffd"
    assert safe_text("two\nlines\tand tab") == "two\nlines\tand tab"
    assert safe_text(r"\x1b \n <b>") == r"\x1b \n <b>"


def test_login_screen() -> None:
    view = View()
    lines = view.login(login_reply())
    text = "\n".join(lines)
    assert "current login user => id:1 name:alice" in text
    # friends online first, with names; groups with members; requests with how to answer them
    assert lines.index("[2] bob  online") < lines.index("[4] dave  offline")
    assert "[9] team: the team" in lines
    assert "    [5] erin  member  offline" in lines
    assert "carol (3) asks to be your friend: \"hi, it's carol\" (accept:3 or reject:3)" in lines
    offline_at = next(i for i, line in enumerate(lines) if "offline messages" in line)
    assert lines[offline_at + 1] == f"{format_ts(TS)} [2]bob said: while you were out"
    assert "(more offline messages follow)" not in text
    assert view.logged_in and view.dir.my_id == 1
    assert view.dir.friends[2]["online"] is True
    assert 3 in view.dir.requests


def test_login_screen_when_empty_and_more() -> None:
    lines = View().login(login_reply(friends=[], groups=[], friend_requests=[], offline=[], more=True))
    text = "\n".join(lines)
    assert "(no friends yet: addfriend:USERID)" in text
    assert "(no groups yet" in text
    assert "(more offline messages follow)" in text


def test_message_lines() -> None:
    view = logged_in_view()
    direct = {"event": "message", "seq": 2, "id": 101, "from": BOB, "to": 1, "text": "hi \\n <i>:)</i>", "ts": TS}
    assert view.event(direct) == [f"{format_ts(TS)} [2]bob said: hi \\n <i>:)</i>"]
    group = {"event": "message", "seq": 3, "id": 102, "from": CAROL, "group_id": 9, "text": "hello team", "ts": TS}
    assert view.event(group) == [f"group [9]team: {format_ts(TS)} [3]carol said: hello team"]
    unknown_group = {**group, "group_id": 77}
    assert view.event(unknown_group)[0].startswith("group [77]: ")
    two_lines = {**direct, "text": "first\nsecond"}
    assert view.event(two_lines) == [f"{format_ts(TS)} [2]bob said: first", "second"]
    escape = {**direct, "text": "\x1b[31mred"}
    assert view.event(escape) == [f"{format_ts(TS)} [2]bob said: \u241b[31mred"]


def test_own_messages_in_history_say_to_whom() -> None:
    view = logged_in_view()
    lines = view.history("with bob (2)", [
        {"id": 5, "from": ALICE, "to": 2, "text": "hi bob", "ts": TS},
        {"id": 6, "from": BOB, "to": 1, "text": "hi alice", "ts": TS},
    ])
    assert lines[1] == f"{format_ts(TS)} [1]alice said: hi bob  (to bob (2))"
    assert lines[2] == f"{format_ts(TS)} [2]bob said: hi alice"
    assert view.history("with dave (4)", []) == ["no messages with dave (4) yet"]


def test_events_update_the_directory_and_read_as_sentences() -> None:
    view = logged_in_view()
    d = view.dir
    assert view.event({"event": "presence", "user_id": 4, "online": True}) == ["dave (4) is online"]
    assert d.friends[4]["online"] is True
    assert view.event({"event": "presence", "user_id": 2, "online": False}) == ["bob (2) went offline"]
    assert d.friends[2]["online"] is False
    assert view.event({"event": "presence", "user_id": 5, "online": True}) == ["erin (5) is online"]
    assert d.groups[9]["members"][1]["online"] is True

    assert view.event({"event": "friend_request", "from": {"id": 6, "name": "frank"}, "note": "", "ts": TS}) == [
        "frank (6) asks to be your friend (accept:6 or reject:6)"]
    assert 6 in d.requests
    assert view.event({"event": "friend_added", "friend": {"id": 3, "name": "carol", "online": True}}) == [
        "you and carol (3) are now friends"]
    assert 3 in d.friends and 3 not in d.requests
    assert view.event({"event": "friend_removed", "user_id": 2}) == ["bob (2) removed you from their friends"]
    assert 2 not in d.friends

    assert view.event({"event": "group_member", "group_id": 9, "user": {"id": 7, "name": "gina"},
                       "joined": True}) == ["gina (7) joined group [9]team"]
    assert [m["id"] for m in d.groups[9]["members"]] == [1, 5, 7]
    assert view.event({"event": "group_member", "group_id": 9, "user": {"id": 5, "name": "erin"},
                       "joined": False}) == ["erin (5) left group [9]team"]
    assert [m["id"] for m in d.groups[9]["members"]] == [1, 7]

    assert view.event({"event": "disconnected"}) == ["connection lost, reconnecting…"]
    assert view.event({"event": "reconnected"}) == ["reconnected"]
    assert view.event({"event": "error", "error": {"code": "bad_json", "message": "not JSON"}}) == [
        "the server could not read what this client sent: not JSON"]
    assert view.event({"event": "something_new"}) == []
    assert d.groups[9]["members"][-1] == {"id": 7, "name": "gina", "role": "member", "online": True}
    assert view.logged_in
    assert "logged in somewhere else" in view.event({"event": "kicked", "reason": "logged_in_elsewhere"})[0]
    assert not view.logged_in


def test_a_lost_connection_when_logged_out_is_not_reconnected() -> None:
    assert View().event({"event": "disconnected"}) == [
        "connection lost: it is opened again when you log in or register"]


def test_friend_and_group_lists() -> None:
    view = logged_in_view()
    assert view.friends([{"id": 8, "name": "hal", "online": False}, {"id": 2, "name": "bob", "online": True}])[1:] \
        == ["[2] bob  online", "[8] hal  offline"]
    assert set(view.dir.friends) == {2, 8}
    assert view.groups([])[1:] == ["(no groups yet: creategroup:NAME:DESC or addgroup:GROUPID)"]
    assert view.dir.groups == {}


@pytest.mark.parametrize(("code", "message", "command", "target", "sentence"), [
    ("not_friends", "user 2 is not your friend", Chat(2, "hi"), None,
     "bob (2) is not your friend yet: send addfriend:2 first"),
    ("not_friends", "user 6 is not your friend", Chat(6, "hi"), None,
     "user 6 is not your friend yet: send addfriend:6 first"),
    ("not_friends", "user 3 is not your friend", Chat("carol", "hi"), 3,
     "carol (3) is not your friend yet: send addfriend:3 first"),
    ("not_friends", "user 3 is not your friend", Unfriend(3), 3, "carol (3) is not your friend"),
    ("already_friends", "user 2 is already your friend", AddFriend(2), 2, "bob (2) is already your friend"),
    ("no_such_user", "no user has id 99", Chat(99, "hi"), 99, "there is no user with id 99"),
    ("no_such_user", "no user", Lookup("zed"), None, "there is no user named zed"),
    ("no_such_group", "no group has id 42", AddGroup(42), None, "there is no group 42: groups lists yours"),
    ("not_member", "you are not a member of group 9", GroupChat(9, "x"), None,
     "you are not a member of group 9: send addgroup:9 first"),
    ("bad_credentials", "wrong name or password", Login("alice"), None, "wrong name or password"),
    ("name_taken", "name taken", Register("alice"), None, "the name alice is taken: choose another"),
    ("already_logged_in", "x", Login("alice"), None,
     "this account is logged in elsewhere, and the server refuses a second login"),
    ("bad_request", "field `user_id`: user 3 has not asked", Accept(3), 3, "carol (3) has not asked to be your friend"),
    ("bad_request", "field `user_id`: you cannot befriend yourself", AddFriend(1), 1, "you cannot befriend yourself"),
    ("bad_request", "field `name`: too long", CreateGroup("x" * 40), None,
     "the server refused that group: field `name`: too long"),
    ("rate_limited", "slow down", Chat(2, "x"), 2, "you are sending too fast: wait a moment and try again"),
    ("unavailable", "db down", Chat(2, "x"), 2,
     "the server cannot do that right now (a backend is down): nothing was changed, try again later"),
    ("internal", "oops", Friends(), None, "the server failed to do that (an internal error): nothing was changed"),
    ("some_new_code", "a sentence from the server", Friends(), None, "a sentence from the server"),
])
def test_errors_read_as_sentences(code: str, message: str, command: object, target: int | None,
                                  sentence: str) -> None:
    view = logged_in_view()
    assert view.error(code, message, command, target) == sentence  # type: ignore[arg-type]


# --------------------------------------------------------------------------- end to end, in a pseudo-terminal

PASSWORD = "secret123"
CLIENT = [sys.executable, "-m", "clusterchat", "client"]


class Terminal:
    """`clusterchat client` in a pseudo-terminal; `type` a line, `expect` text on the screen."""

    def __init__(self, port: int, log_path: Path, *extra: str) -> None:
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1"}
        self.log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.child = pexpect.spawn(CLIENT[0], [*CLIENT[1:], "--host", "127.0.0.1", "--port", str(port), *extra],
                                   env=env, dimensions=(50, 250), encoding="utf-8", codec_errors="replace",
                                   timeout=30)
        self.child.logfile_read = self.log

    def type(self, line: str) -> None:
        self.child.send(line + "\r")

    def expect(self, text: str, timeout: float = 30) -> str:
        """Wait for `text` (exactly) on the screen; what came before it since the last expect."""
        self.child.expect_exact(text, timeout=timeout)
        before: str = self.child.before
        return before

    def expect_line(self, text: str, timeout: float = 30) -> None:
        """Wait for `text` ending a line."""
        self.expect_re(re.escape(text) + r"\r*\n", timeout)

    def expect_re(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        self.child.expect(pattern, timeout=timeout)
        match: re.Match[str] = self.child.match
        return match

    def menu(self, choice: str, name: str, password: str = PASSWORD) -> None:
        self.expect("3. quit")
        self.expect("choice:")
        self.type(choice)
        self.expect("name:")
        self.type(name)
        self.expect("password:")
        self.type(password)

    def register(self, name: str) -> int:
        self.menu("2", name)
        return int(self.expect_re(rf"registered {name}: your user id is (\d+)").group(1))

    def login(self, name: str) -> str:
        """Log in; the welcome screen's text up to its end."""
        self.menu("1", name)
        self.expect("current login user => id:")
        return self.expect("type help for the commands")

    def quit(self) -> int | None:
        self.type("quit")
        self.expect("bye")
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.close()
        status: int | None = self.child.exitstatus
        return status

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.log.close()


OpenTerminal = Callable[..., Terminal]


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[OpenTerminal]:
    """`terminal(port, label)`: a client in a pseudo-terminal, closed after the test (log in tmp_path)."""
    opened: list[Terminal] = []

    def open_terminal(port: int, label: str, *extra: str) -> Terminal:
        term = Terminal(port, tmp_path / f"terminal-{label}-{len(opened)}.log", *extra)
        opened.append(term)
        return term

    yield open_terminal
    for term in opened:
        term.close()


def two_users(node: NodeProcess, terminal: OpenTerminal) -> tuple[Terminal, int, Terminal, int]:
    alice, bob = terminal(node.port, "alice"), terminal(node.port, "bob")
    alice_id, bob_id = alice.register("alice"), bob.register("bob")
    alice.login("alice")
    bob.login("bob")
    return alice, alice_id, bob, bob_id


def make_friends(alice: Terminal, alice_id: int, bob: Terminal, bob_id: int) -> None:
    alice.type(f"addfriend:{bob_id}")
    bob.expect(f"asks to be your friend (accept:{alice_id} or reject:{alice_id})")
    bob.type(f"accept:{alice_id}")
    bob.expect(f"you and alice ({alice_id}) are now friends")
    alice.expect(f"you and bob ({bob_id}) are now friends")


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
class TestInATerminal:
    def test_befriend_and_chat_both_ways(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice, alice_id, bob, bob_id = two_users(node, terminal)
        alice.type("lookup:bob")
        alice.expect(f"bob has user id {bob_id}: addfriend:{bob_id}")
        alice.type(f"chat:{bob_id}:too early")
        alice.expect(f"bob ({bob_id}) is not your friend yet: send addfriend:{bob_id} first")

        alice.type("addfriend:bob:it's alice")
        alice.expect(f"friend request sent to bob ({bob_id})")
        bob.expect(f"alice ({alice_id}) asks to be your friend: \"it's alice\" "
                   f"(accept:{alice_id} or reject:{alice_id})")
        bob.type(f"accept:{alice_id}")
        bob.expect(f"you and alice ({alice_id}) are now friends")
        alice.expect(f"you and bob ({bob_id}) are now friends")

        text = r"hello bob: a:b \n \t <b>not bold</b>"
        alice.type(f"chat:{bob_id}:{text}")
        bob.expect_line(f"[{alice_id}]alice said: {text}")
        bob.type("chat:alice:hi alice")  # a friend by name
        alice.expect(f"[{bob_id}]bob said: hi alice")

        alice.type("friends")
        alice.expect(f"[{bob_id}] bob  online")
        alice.type("history:bob")
        alice.expect("history with bob")
        alice.expect(f"[{alice_id}]alice said: {text}  (to bob ({bob_id}))")
        alice.expect(f"[{bob_id}]bob said: hi alice")

        assert bob.quit() == 0
        alice.expect(f"bob ({bob_id}) went offline")

    def test_typed_line_survives_incoming_messages(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice, alice_id, bob, bob_id = two_users(node, terminal)
        make_friends(alice, alice_id, bob, bob_id)
        alice.child.send(f"chat:{bob_id}:half typed")
        time.sleep(1)
        bob.type(f"chat:{alice_id}:arrives in between")
        alice.expect(f"[{bob_id}]bob said: arrives in between")
        time.sleep(0.5)
        alice.type(", then finished")
        bob.expect_line(f"[{alice_id}]alice said: half typed, then finished")

    def test_offline_messages_after_loginout_and_after_quit(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice, alice_id, bob, bob_id = two_users(node, terminal)
        make_friends(alice, alice_id, bob, bob_id)

        bob.type("loginout")
        bob.expect("logged out")
        alice.expect(f"bob ({bob_id}) went offline")
        for n in (1, 2):
            alice.type(f"chat:{bob_id}:while you were out {n}")
            alice.expect(f"bob ({bob_id}) is offline: the message waits for their next login")
        welcome = bob.login("bob")
        offline = welcome[welcome.index("offline messages"):]
        assert offline.index("alice said: while you were out 1") < offline.index("alice said: while you were out 2")
        assert f"[{alice_id}] alice  online" in welcome
        alice.type(f"chat:{bob_id}:live again")
        shown = bob.expect(f"[{alice_id}]alice said: live again")
        assert "while you were out" not in shown  # shown once, on the welcome screen

        assert alice.quit() == 0
        bob.expect(f"alice ({alice_id}) went offline")
        bob.type(f"chat:{alice_id}:after you quit")
        bob.expect(f"alice ({alice_id}) is offline")
        again = terminal(node.port, "alice-again")
        welcome = again.login("alice")
        assert f"[{bob_id}]bob said: after you quit" in welcome[welcome.index("offline messages"):]
        assert "live again" not in welcome  # received and acknowledged in the first session
        bob.expect(f"alice ({alice_id}) is online")

    def test_groups(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice, alice_id, bob, bob_id = two_users(node, terminal)
        alice.type("creategroup:team:our team: the best")
        group = int(alice.expect_re(r"created group \[(\d+)\]team: others join it with addgroup:(\d+)").group(1))
        bob.type(f"addgroup:{group}")
        bob.expect(f"you joined group [{group}]team (2 members)")
        alice.expect(f"bob ({bob_id}) joined group [{group}]team")

        bob.type(f"groupchat:{group}:hello team")
        alice.expect_re(rf"group \[{group}\]team: \S+ \S+ \[{bob_id}\]bob said: hello team\r*\n")
        alice.type(f"groupchat:{group}:hi bob")
        bob.expect_re(rf"group \[{group}\]team: \S+ \S+ \[{alice_id}\]alice said: hi bob\r*\n")

        alice.type(f"grouphistory:{group}")
        alice.expect(f"history of group [{group}]team")
        alice.expect("bob said: hello team")
        alice.expect("alice said: hi bob")
        bob.type("groups")
        bob.expect(f"[{group}] team: our team: the best")
        bob.expect(f"[{alice_id}] alice  creator  online")

        bob.type(f"leavegroup:{group}")
        bob.expect(f"you left group [{group}]team")
        alice.expect(f"bob ({bob_id}) left group [{group}]team")
        bob.type(f"groupchat:{group}:still here?")
        bob.expect(f"you are not a member of group {group}: send addgroup:{group} first")
        bob.type("addgroup:999")
        bob.expect("there is no group 999: groups lists yours")

    def test_errors_read_as_sentences(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice = terminal(node.port, "alice")
        alice_id = alice.register("alice")
        alice.menu("2", "alice")
        alice.expect("the name alice is taken: choose another")
        alice.menu("1", "alice", "wrong-password")
        alice.expect("wrong name or password")
        alice.login("alice")
        for line, sentence in [
            ("chat:42:hi", "there is no user with id 42"),
            ("chat:nobody:hi", "there is no user named nobody"),
            ("addfriend:alice", "you cannot befriend yourself"),
            ("accept:alice", f"alice ({alice_id}) has not asked to be your friend"),
            ("chat:2", "usage: chat:FRIENDID:TEXT"),
            ("dance", "there is no command 'dance': type help for the list"),
        ]:
            alice.type(line)
            before = alice.expect(sentence)
            assert "{" not in before and "_" not in before.replace("\x1b", "")  # no JSON, no error codes

    def test_kicked_by_a_second_login(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        first = terminal(node.port, "first")
        first.register("alice")
        first.login("alice")
        second = terminal(node.port, "second")
        second.login("alice")
        first.expect("you logged in somewhere else, so this session was closed")
        first.expect("3. quit")
        second.type("help")
        second.expect("groupchat:GROUPID:TEXT")

    def test_reconnects_after_the_node_restarts(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice, alice_id, bob, bob_id = two_users(node, terminal)
        make_friends(alice, alice_id, bob, bob_id)
        node.kill()
        alice.expect("connection lost, reconnecting…")
        bob.expect("connection lost, reconnecting…")
        node.start()
        alice.expect("reconnected", timeout=60)
        bob.expect("reconnected", timeout=60)
        alice.type(f"chat:{bob_id}:after the restart")
        bob.expect(f"[{alice_id}]alice said: after the restart")

    def test_over_websocket(self, node: NodeProcess, terminal: OpenTerminal) -> None:
        alice = terminal(node.port, "alice")
        alice_id = alice.register("alice")
        alice.login("alice")
        carol = terminal(node.ws_port, "carol", "--ws")
        carol.register("carol")
        carol.login("carol")
        carol.type(f"addfriend:{alice_id}")
        alice.expect("carol")
        alice.type("accept:carol")
        carol.expect(f"you and alice ({alice_id}) are now friends")
        alice.type("chat:carol:over tcp to ws")
        carol.expect(f"[{alice_id}]alice said: over tcp to ws")


def test_cannot_connect(terminal: OpenTerminal) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    term = terminal(port, "nowhere")
    term.expect(f"cannot connect to 127.0.0.1:{port}: connection refused")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 1
