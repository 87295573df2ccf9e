"""The terminal client's loop: the seed's menu, then commands; events printed as they arrive.

Lines are read with prompt_toolkit; what is shown while the user types is printed above the
prompt and the half-typed line is drawn again below it (`patch_stdout` does the same for stray
output). Everything the user sees comes from `View`; everything sent goes through the library's
`Client`, which also reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import sys
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.history import DummyHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.utils import is_dumb_terminal

from clusterchat.client import Client, ConnectionClosed, ReplyError
from clusterchat.terminal.commands import (
    MAX_NAME,
    Accept,
    AddFriend,
    AddGroup,
    Chat,
    Command,
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
    UserRef,
    parse_command,
    parse_menu_choice,
)
from clusterchat.terminal.view import View

DEFAULT_HISTORY = 20

log = logging.getLogger(__name__)


class _Interrupted(Exception):
    """Ends the prompt being typed when the session changed under it (kicked)."""


class _Unresolved(Exception):
    """A user given by a name that no user has; the message is the sentence to show."""


class TerminalApp:
    def __init__(self, host: str, port: int, *, websocket: bool = False) -> None:
        self.host = host
        self.port = port
        self.websocket = websocket
        self.view = View()
        self.client: Client | None = None
        self._events: asyncio.Task[None] | None = None
        self._lines: PromptSession[str] = PromptSession()
        self._secrets: PromptSession[str] = PromptSession(history=DummyHistory())  # no recalling passwords
        # Offline messages shown on the login screen also come through the event iterator:
        # hold message events until the screen is shown, then skip the ones it showed.
        self._login_done = asyncio.Event()
        self._login_done.set()
        self._shown: set[int] = set()

    # ------------------------------------------------------------------ output and input

    @staticmethod
    def say(*lines: str) -> None:
        """Print above the prompt being typed (at once when none is), as plain text: no markup."""
        if lines:
            print_formatted_text("\n".join(lines))

    async def ask(self, message: str) -> str:
        return await self._lines.prompt_async(message)

    async def ask_secret(self, message: str) -> str:
        if is_dumb_terminal():  # prompt_toolkit's dumb mode would echo the password
            return await asyncio.to_thread(getpass.getpass, message)
        return await self._secrets.prompt_async(message, is_password=True)

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> Client:
        if self.client is not None and self.client.connected:
            return self.client
        await self._close_client()
        client = Client(self.host, self.port, websocket=self.websocket, reconnect=True)
        await client.connect()
        self.client = client
        self._events = asyncio.create_task(self._show_events(client))
        return client

    async def _close_client(self) -> None:
        client, task = self.client, self._events
        self.client, self._events = None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _show_events(self, client: Client) -> None:
        async for event in client.events():
            kind = event.get("event")
            if kind == "message":
                await self._login_done.wait()
                if event.get("id") in self._shown:
                    self._shown.discard(event["id"])
                    continue
            try:
                self.say(*self.view.event(event))
            except (KeyError, TypeError, ValueError, AttributeError):  # a malformed event: skip it
                log.warning("cannot show event %r", kind, exc_info=True)
            if kind == "reconnected" and self.view.logged_in:
                # Presence changed while we were away; the friends list is cheap to refresh.
                with contextlib.suppress(ReplyError, ConnectionClosed, TimeoutError, OSError):
                    self.view.dir.set_friends((await client.friends())["friends"])
            elif kind == "kicked":
                self._back_to_menu()
        if self.client is client and self.view.logged_in:
            # The library gave up (the server refused the token): the session is over.
            self.say("could not log in again: log in from the menu")
            self.view.reset()
            self._back_to_menu()

    def _back_to_menu(self) -> None:
        """The session ended under the prompt being typed: end that prompt, so the menu comes."""
        self._shown.clear()
        app = self._lines.app
        if app.is_running:
            app.exit(exception=_Interrupted())

    # ------------------------------------------------------------------ the loop

    async def run(self) -> int:
        try:
            await self._connect()
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self.say(f"cannot connect to {self.host}:{self.port}: {_reason(exc)}")
            return 1
        self.say(f"connected to {self.host}:{self.port}")
        try:
            while True:
                if self.view.logged_in:
                    if not await self._command_step():
                        break
                elif not await self._menu_step():
                    break
        except (EOFError, KeyboardInterrupt):
            pass
        finally:
            await self._close_client()
        self.say("bye")
        return 0

    async def _menu_step(self) -> bool:
        """One round of the first screen; False to quit."""
        self.say(*self.view.menu())
        try:
            line = await self.ask("choice: ")
        except _Interrupted:
            return True
        choice = parse_menu_choice(line)
        if choice is None:
            if line.strip():
                self.say(f"there is no choice {line.strip()!r}: type 1, 2 or 3")
            return True
        if choice is MenuChoice.QUIT:
            return False
        name = (await self.ask("name: ")).strip()
        if not name or len(name) > MAX_NAME or any(c.isspace() for c in name):
            self.say(f"a name is 1 to {MAX_NAME} characters without spaces")
            return True
        password = await self.ask_secret("password: ")
        if choice is MenuChoice.LOGIN:
            await self._login(name, password)
        else:
            await self._register(name, password)
        return True

    async def _login(self, name: str, password: str) -> None:
        self._login_done.clear()
        try:
            client = await self._connect()
            reply = await client.login(name, password)
        except ReplyError as exc:
            self.say(self.view.error(*_error(exc), Login(name)))
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self.say(f"cannot log in now: {_reason(exc)}")
        else:
            self._shown = {m["id"] for m in reply.get("offline") or ()}
            self.say(*self.view.login(reply))
        finally:
            self._login_done.set()

    async def _register(self, name: str, password: str) -> None:
        if not 6 <= len(password) <= 128:
            self.say("a password has 6 to 128 characters")
            return
        try:
            client = await self._connect()
            reply = await client.register(name, password)
        except ReplyError as exc:
            self.say(self.view.error(*_error(exc), Register(name)))
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self.say(f"cannot register now: {_reason(exc)}")
        else:
            self.say(f"registered {name}: your user id is {reply['user_id']}. Now log in (1).")

    async def _command_step(self) -> bool:
        """Read and carry out one command; False to quit."""
        me = self.view.dir.me or {}
        try:
            line = await self.ask(f"{me.get('name', '')}> ")
        except _Interrupted:
            return True
        try:
            command = parse_command(line)
        except CommandError as exc:
            self.say(str(exc))
            return True
        if command is None:
            return True
        if isinstance(command, Quit):
            return False
        try:
            await self.execute(command)
        except _Unresolved as exc:
            self.say(str(exc))
        except ReplyError as exc:
            self.say(self.view.error(*_error(exc), command, getattr(exc, "target", None)))
        except (ConnectionClosed, OSError) as exc:
            self.say(f"that was not done: the connection is down ({_reason(exc)}); try again once it is back")
        except TimeoutError:
            self.say("the server did not answer in time, so that may or may not have been done")
        return True

    # ------------------------------------------------------------------ commands

    async def execute(self, command: Command) -> None:
        client = self.client
        if client is None:
            raise ConnectionClosed("not connected")
        view, d = self.view, self.view.dir
        match command:
            case Help():
                self.say(*view.help())
            case Chat(to, text):
                user_id = await self._user_id(client, to)
                await _about(user_id, client.send(user_id, text))
                friend = d.friends.get(user_id)
                if friend is not None and not friend.get("online"):
                    self.say(f"{d.who(user_id)} is offline: the message waits for their next login")
            case AddFriend(user, note):
                user_id = await self._user_id(client, user)
                await _about(user_id, client.friend_request(user_id, note=note))
                view.dir.set_friends((await client.friends())["friends"])
                if user_id in d.friends:
                    d.requests.pop(user_id, None)
                    self.say(f"{d.who(user_id)} had asked you too: you are now friends")
                else:
                    self.say(f"friend request sent to {d.who(user_id)}")
            case Accept(user):
                user_id = await self._user_id(client, user)
                reply = await _about(user_id, client.friend_accept(user_id))
                d.learn(reply["friend"])
                d.friends[user_id] = dict(reply["friend"])
                d.requests.pop(user_id, None)
                self.say(f"you and {d.who(user_id)} are now friends")
            case Reject(user):
                user_id = await self._user_id(client, user)
                await _about(user_id, client.friend_reject(user_id))
                d.requests.pop(user_id, None)
                self.say(f"you rejected {d.who(user_id)}'s friend request")
            case Unfriend(user):
                user_id = await self._user_id(client, user)
                await _about(user_id, client.unfriend(user_id))
                d.friends.pop(user_id, None)
                self.say(f"{d.who(user_id)} is no longer your friend")
            case Friends():
                self.say(*view.friends((await client.friends())["friends"]))
            case Groups():
                self.say(*view.groups((await client.groups())["groups"]))
            case CreateGroup(name, desc):
                group = (await client.create_group(name, desc=desc))["group"]
                d.add_group(group)
                self.say(f"created group [{group['id']}]{group['name']}: others join it with addgroup:{group['id']}")
            case AddGroup(group_id):
                group = (await client.join_group(group_id))["group"]
                d.add_group(group)
                self.say(f"you joined group [{group_id}]{group['name']} ({len(group.get('members') or ())} members)")
            case LeaveGroup(group_id):
                await client.leave_group(group_id)
                label = d.group_label(group_id)
                d.groups.pop(group_id, None)
                self.say(f"you left group {label}")
            case GroupChat(group_id, text):
                await client.group_send(group_id, text)
            case History(with_, limit):
                user_id = await self._user_id(client, with_)
                reply = await _about(user_id, client.history(with_=user_id, limit=limit or DEFAULT_HISTORY))
                self.say(*view.history(f"with {d.who(user_id)}", reply["messages"]))
            case GroupHistory(group_id, limit):
                reply = await client.history(group_id=group_id, limit=limit or DEFAULT_HISTORY)
                self.say(*view.history(f"of group {d.group_label(group_id)}", reply["messages"]))
            case Lookup(name):
                found = (await client.lookup(name))["user"]
                d.learn(found)
                relation = " and is your friend" if found["id"] in d.friends else f": addfriend:{found['id']}"
                self.say(f"{found['name']} has user id {found['id']}{relation}")
            case Logout():
                await client.logout()
                self._shown.clear()
                view.reset()
                self.say("logged out")

    async def _user_id(self, client: Client, ref: UserRef) -> int:
        """The id of a user given by id or by name (asking the server for names it hasn't seen)."""
        user_id = self.view.dir.user_id(ref)
        if user_id is not None:
            return user_id
        try:
            user = (await client.lookup(str(ref)))["user"]
        except ReplyError as exc:
            if exc.code == "no_such_user":
                raise _Unresolved(f"there is no user named {ref}") from exc
            raise
        self.view.dir.learn(user)
        return int(user["id"])


async def _about(user_id: int, request: Any) -> Any:
    """Await a request about a user; a `ReplyError` from it carries the user's id, for the sentence."""
    try:
        return await request
    except ReplyError as exc:
        exc.target = user_id  # type: ignore[attr-defined]
        raise


def _error(exc: ReplyError) -> tuple[str, str | None]:
    return exc.code, exc.message


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    return str(exc) or type(exc).__name__


async def run_terminal(host: str, port: int, *, websocket: bool = False) -> int:
    """Run the client until the user quits; the exit code."""
    app = TerminalApp(host, port, websocket=websocket)
    with patch_stdout():
        # Log lines too must go above the prompt, not through the line being typed.
        moved = [h for h in logging.getLogger().handlers
                 if isinstance(h, logging.StreamHandler) and h.stream in (sys.__stderr__, sys.__stdout__)]
        streams = [h.setStream(sys.stderr) for h in moved]
        try:
            return await app.run()
        finally:
            for handler, stream in zip(moved, streams, strict=True):
                handler.setStream(stream)
