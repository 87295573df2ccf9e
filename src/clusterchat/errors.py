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


class BadJson(ChatError):
    code = ErrorCode.BAD_JSON
    default_message = "the frame is not a JSON object"


class FrameTooLarge(ChatError):
    code = ErrorCode.FRAME_TOO_LARGE
    default_message = "the frame is too large"


class BadRequest(ChatError):
    code = ErrorCode.BAD_REQUEST
    default_message = "bad request"


class UnknownOp(ChatError):
    code = ErrorCode.UNKNOWN_OP
    default_message = "no such op"


class NotLoggedIn(ChatError):
    code = ErrorCode.NOT_LOGGED_IN
    default_message = "log in first"


class BadCredentials(ChatError):
    code = ErrorCode.BAD_CREDENTIALS
    default_message = "wrong name, password or token"


class AlreadyLoggedIn(ChatError):
    code = ErrorCode.ALREADY_LOGGED_IN
    default_message = "already logged in"


class NameTaken(ChatError):
    code = ErrorCode.NAME_TAKEN
    default_message = "that name is taken"


class NoSuchUser(ChatError):
    code = ErrorCode.NO_SUCH_USER
    default_message = "no such user"


class NoSuchGroup(ChatError):
    code = ErrorCode.NO_SUCH_GROUP
    default_message = "no such group"


class NoSuchRoom(ChatError):
    code = ErrorCode.NO_SUCH_ROOM
    default_message = "no such room"


class NotMember(ChatError):
    code = ErrorCode.NOT_MEMBER
    default_message = "you are not a member"


class NotFriends(ChatError):
    code = ErrorCode.NOT_FRIENDS
    default_message = "that user is not your friend"


class AlreadyFriends(ChatError):
    code = ErrorCode.ALREADY_FRIENDS
    default_message = "you are already friends"


class WrongNode(ChatError):
    code = ErrorCode.WRONG_NODE
    default_message = "that room lives on another node"


class RateLimited(ChatError):
    code = ErrorCode.RATE_LIMITED
    default_message = "too many requests; slow down"


class Unavailable(ChatError):
    code = ErrorCode.UNAVAILABLE
    default_message = "a backend is unavailable; nothing was changed, retry later"


class Internal(ChatError):
    code = ErrorCode.INTERNAL
    default_message = "internal error"


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
