"""What the user types, parsed: the seed client's menu and `command:arg:arg` lines, with no I/O.

`parse_command` turns one typed line into a `Command` (or None for a blank line) and raises
`CommandError`, whose message is a sentence for the user, for anything it cannot read. Text
fields (a message, a note, a description) are everything after their colon, kept exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_ID = 2**53 - 1
MAX_TEXT = 4096
MAX_NAME = 32
MAX_LIMIT = 100

UserRef = int | str
"""A user as typed: an id (digits) or a user's name."""


class CommandError(ValueError):
    """A typed line that cannot be carried out; `str(error)` is a sentence for the user."""


class MenuChoice(enum.Enum):
    LOGIN = "login"
    REGISTER = "register"
    QUIT = "quit"


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Chat:
    to: UserRef
    text: str


@dataclass(frozen=True)
class AddFriend:
    user: UserRef
    note: str | None = None


@dataclass(frozen=True)
class Accept:
    user: UserRef


@dataclass(frozen=True)
class Reject:
    user: UserRef


@dataclass(frozen=True)
class Unfriend:
    user: UserRef


@dataclass(frozen=True)
class Friends:
    pass


@dataclass(frozen=True)
class CreateGroup:
    name: str
    desc: str | None = None


@dataclass(frozen=True)
class AddGroup:
    group_id: int


@dataclass(frozen=True)
class LeaveGroup:
    group_id: int


@dataclass(frozen=True)
class Groups:
    pass


@dataclass(frozen=True)
class GroupChat:
    group_id: int
    text: str


@dataclass(frozen=True)
class History:
    with_: UserRef
    limit: int | None = None


@dataclass(frozen=True)
class GroupHistory:
    group_id: int
    limit: int | None = None


@dataclass(frozen=True)
class Lookup:
    name: str


@dataclass(frozen=True)
class Logout:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Login:
    """The first menu's login (not typed as a command line; here so errors can name it)."""

    name: str


@dataclass(frozen=True)
class Register:
    name: str


Command = (Help | Chat | AddFriend | Accept | Reject | Unfriend | Friends | CreateGroup | AddGroup | LeaveGroup
           | Groups | GroupChat | History | GroupHistory | Lookup | Logout | Quit)

# (usage, what it does), in the order `help` lists them; the first seven are the seed client's.
HELP: tuple[tuple[str, str], ...] = (
    ("help", "show this list of commands"),
    ("chat:FRIENDID:TEXT", "send TEXT to a friend (FRIENDID may also be the friend's name)"),
    ("addfriend:USERID[:NOTE]", "ask a user (id or name) to be your friend"),
    ("creategroup:NAME[:DESC]", "create a group"),
    ("addgroup:GROUPID", "join a group"),
    ("groupchat:GROUPID:TEXT", "send TEXT to a group"),
    ("loginout", "log out and go back to the first menu"),
    ("accept:USERID", "accept a friend request"),
    ("reject:USERID", "reject a friend request"),
    ("unfriend:USERID", "end a friendship"),
    ("friends", "list your friends, online or not"),
    ("groups", "list your groups and their members"),
    ("leavegroup:GROUPID", "leave a group"),
    ("history:FRIENDID[:N]", "the last N (default 20, at most 100) messages with a friend"),
    ("grouphistory:GROUPID[:N]", "the last N messages of a group"),
    ("lookup:NAME", "find a user's id by name"),
    ("quit", "leave the client (messages sent to you wait for your next login)"),
)

_USAGE = {usage.split(":", 1)[0].split("[", 1)[0]: usage for usage, _ in HELP}

_ALIASES = {
    "logout": "loginout",
    "exit": "quit",
    "joingroup": "addgroup",
    "deletefriend": "unfriend",
    "removefriend": "unfriend",
}


def parse_menu_choice(line: str) -> MenuChoice | None:
    """The first screen's choice: `1`/`login`, `2`/`register`, `3`/`quit`; None if it is neither."""
    word = line.strip().lower()
    for number, choice in (("1", MenuChoice.LOGIN), ("2", MenuChoice.REGISTER), ("3", MenuChoice.QUIT)):
        if word in (number, f"{number}.", choice.value):
            return choice
    if word in ("q", "exit"):
        return MenuChoice.QUIT
    return None


def parse_command(line: str) -> Command | None:
    """One typed line as a `Command`; None for a blank line. Raises `CommandError`."""
    if not line.strip():
        return None
    head, sep, rest = line.partition(":")
    word = head.strip().lower()
    word = _ALIASES.get(word, word)
    args = _Args(word, rest if sep else None)
    match word:
        case "help":
            return args.none(Help())
        case "friends":
            return args.none(Friends())
        case "groups":
            return args.none(Groups())
        case "loginout":
            return args.none(Logout())
        case "quit":
            return args.none(Quit())
        case "chat":
            to, text = args.split(2)
            return Chat(_user(word, to), _text(text))
        case "addfriend":
            user, note = args.split(2, optional_last=True)
            return AddFriend(_user(word, user), note or None)
        case "accept":
            return Accept(_user(word, args.one()))
        case "reject":
            return Reject(_user(word, args.one()))
        case "unfriend":
            return Unfriend(_user(word, args.one()))
        case "creategroup":
            name, desc = args.split(2, optional_last=True)
            if not name.strip():
                raise CommandError(f"the group needs a name: {_USAGE[word]}")
            return CreateGroup(name.strip(), desc or None)
        case "addgroup":
            return AddGroup(_group(word, args.one()))
        case "leavegroup":
            return LeaveGroup(_group(word, args.one()))
        case "groupchat":
            group, text = args.split(2)
            return GroupChat(_group(word, group), _text(text))
        case "history":
            friend, limit = args.split(2, optional_last=True)
            return History(_user(word, friend), _limit(word, limit))
        case "grouphistory":
            group, limit = args.split(2, optional_last=True)
            return GroupHistory(_group(word, group), _limit(word, limit))
        case "lookup":
            name = args.one()
            if not name or any(c.isspace() for c in name):
                raise CommandError(f"a name has no spaces: {_USAGE[word]}")
            return Lookup(name)
    raise CommandError(f"there is no command {head.strip()!r}: type help for the list")


class _Args:
    """The part of a line after the command word, split on colons as the command needs."""

    def __init__(self, word: str, rest: str | None) -> None:
        self.word = word
        self.rest = rest

    def _usage_error(self) -> CommandError:
        return CommandError(f"usage: {_USAGE[self.word]}")

    def none(self, command: Command) -> Command:
        if self.rest is not None and self.rest.strip():
            raise CommandError(f"{self.word} takes nothing after it: type just {self.word}")
        return command

    def one(self) -> str:
        if self.rest is None or not self.rest.strip():
            raise self._usage_error()
        return self.rest.strip()

    def split(self, n: int, *, optional_last: bool = False) -> list[str]:
        """The first n-1 fields split on colons (stripped), then the rest exactly as typed."""
        if self.rest is None:
            raise self._usage_error()
        parts = self.rest.split(":", n - 1)
        if len(parts) < n:
            if not optional_last:
                raise self._usage_error()
            parts.append("")
        fields = [p.strip() for p in parts[:-1]]
        if not all(fields):
            raise self._usage_error()
        return [*fields, parts[-1]]


def _user(word: str, arg: str) -> UserRef:
    if arg.isascii() and arg.isdigit():
        return _id(word, arg)
    if len(arg) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in arg):
        raise CommandError(f"{arg!r} is neither a user id nor a user's name: {_USAGE[word]}")
    return arg


def _group(word: str, arg: str) -> int:
    if not (arg.isascii() and arg.isdigit()):
        raise CommandError(f"a group is given by its number, not {arg!r}: {_USAGE[word]} (groups lists them)")
    return _id(word, arg)


def _id(word: str, arg: str) -> int:
    value = int(arg)
    if not 0 < value <= MAX_ID:
        raise CommandError(f"{arg} is not a valid id: {_USAGE[word]}")
    return value


def _text(text: str) -> str:
    if not text:
        raise CommandError("the message is empty: type it after the last colon")
    if len(text) > MAX_TEXT:
        raise CommandError(f"the message is too long ({len(text)} characters; at most {MAX_TEXT})")
    return text


def _limit(word: str, arg: str) -> int | None:
    arg = arg.strip()
    if not arg:
        return None
    if not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= MAX_LIMIT:
        raise CommandError(f"the number of messages is 1 to {MAX_LIMIT}, not {arg!r}: {_USAGE[word]}")
    return int(arg)
