"""The one exception tree of clusterchat and its mapping onto protocol error codes.

Services raise these; the session layer turns them into `error` objects in exactly
one place (`error_body`). Anything else that escapes a handler is a bug: it is
logged with its traceback and sent as `internal` with no detail.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NOT_LOGGED_IN = "not_logged_in"
    BAD_CREDENTIALS = "bad_credentials"
    ALREADY_LOGGED_IN = "already_logged_in"
    NAME_TAKEN = "name_taken"
    NO_SUCH_USER = "no_such_user"
    NO_SUCH_GROUP = "no_such_group"
    NO_SUCH_ROOM = "no_such_room"
    NOT_MEMBER = "not_member"
    NOT_FRIENDS = "not_friends"
    ALREADY_FRIENDS = "already_friends"
    WRONG_NODE = "wrong_node"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ChatError(Exception):
    """An error a client may see. `message` is a sentence for a person, never a secret."""

    code: ErrorCode = ErrorCode.INTERNAL
    default_message = "internal error"

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, **self.extra}


def _error(code: ErrorCode, default: str) -> type[ChatError]:
    return type(
        "".join(part.title() for part in code.value.split("_")) + "Error",
        (ChatError,),
        {"code": code, "default_message": default},
    )


BadJson = _error(ErrorCode.BAD_JSON, "the frame is not a JSON object")
FrameTooLarge = _error(ErrorCode.FRAME_TOO_LARGE, "the frame is too large")
BadRequest = _error(ErrorCode.BAD_REQUEST, "bad request")
UnknownOp = _error(ErrorCode.UNKNOWN_OP, "no such op")
NotLoggedIn = _error(ErrorCode.NOT_LOGGED_IN, "log in first")
BadCredentials = _error(ErrorCode.BAD_CREDENTIALS, "wrong name, password or token")
AlreadyLoggedIn = _error(ErrorCode.ALREADY_LOGGED_IN, "already logged in")
NameTaken = _error(ErrorCode.NAME_TAKEN, "that name is taken")
NoSuchUser = _error(ErrorCode.NO_SUCH_USER, "no such user")
NoSuchGroup = _error(ErrorCode.NO_SUCH_GROUP, "no such group")
NoSuchRoom = _error(ErrorCode.NO_SUCH_ROOM, "no such room")
NotMember = _error(ErrorCode.NOT_MEMBER, "you are not a member")
NotFriends = _error(ErrorCode.NOT_FRIENDS, "that user is not your friend")
AlreadyFriends = _error(ErrorCode.ALREADY_FRIENDS, "you are already friends")
WrongNode = _error(ErrorCode.WRONG_NODE, "that room lives on another node")
RateLimited = _error(ErrorCode.RATE_LIMITED, "too many requests; slow down")
Unavailable = _error(ErrorCode.UNAVAILABLE, "a backend is unavailable; nothing was changed, retry later")
Internal = _error(ErrorCode.INTERNAL, "internal error")


# Backends register the exception types that mean "cannot be reached now" (a lost
# database or Redis connection); those become `unavailable` instead of `internal`.
_UNAVAILABLE_TYPES: list[type[BaseException]] = [ConnectionError, TimeoutError]


def register_unavailable(*types: type[BaseException]) -> None:
    _UNAVAILABLE_TYPES.extend(t for t in types if t not in _UNAVAILABLE_TYPES)


def as_chat_error(exc: BaseException) -> ChatError | None:
    """The ChatError an exception stands for, or None when it is a bug."""
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, tuple(_UNAVAILABLE_TYPES)):
        return Unavailable()
    return None


def error_body(exc: BaseException) -> dict[str, Any]:
    """The `error` object for any exception; unknown ones become a bare `internal`."""
    known = as_chat_error(exc)
    if known is not None:
        return known.body()
    return {"code": ErrorCode.INTERNAL.value, "message": Internal.default_message}
