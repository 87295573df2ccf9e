"""Frames to typed requests, and replies and events to frames.

`decode_request` is the only parser of client input. The fast path is one msgspec
decode into the tagged union of requests; only a frame that fails it is decoded a
second time, generically, to tell `bad_json`, `bad_request` and `unknown_op` apart
and to recover the `rid` for the error reply.
"""

from __future__ import annotations

import re
from typing import Any, Union

import msgspec

from clusterchat.errors import BadJson, BadRequest, ChatError, UnknownOp
from clusterchat.protocol.requests import ALL_REQUESTS, NAME_PATTERN, NO_NUL_PATTERN, OPS, Request

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Union[ALL_REQUESTS])  # noqa: UP007
_generic = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
encode = _encoder.encode

# msgspec names a failed pattern by its regex; a person gets a sentence instead.
_PATTERN_SENTENCES = {
    NAME_PATTERN: "expected 1 to 32 characters with no whitespace or control characters",
    NO_NUL_PATTERN: "must not contain the NUL character",
}
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


class RequestError(Exception):
    """A frame that could not become a request: the error to send and the rid to echo.

    `op` is the op named by the frame, when it named a string, so the reply can carry it.
    """

    def __init__(self, error: ChatError, rid: str | int | None = None, op: str | None = None):
        super().__init__(error.message)
        self.error = error
        self.rid = rid
        self.op = op


def decode_request(frame: bytes | str) -> Request:
    """Parse one frame; raise RequestError with the protocol error otherwise."""
    try:
        return _decoder.decode(frame)  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    raise _explain(frame)


def _explain(frame: bytes | str) -> RequestError:
    try:
        obj = _generic.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
        return RequestError(BadJson("the frame is not valid JSON"))
    if not isinstance(obj, dict):
        return RequestError(BadJson("the frame is not a JSON object"))
    rid = obj.get("rid")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        rid = None
    op = obj.get("op")
    if op is None:
        return RequestError(BadRequest("field `op` is missing"), rid)
    if not isinstance(op, str):
        return RequestError(BadRequest("field `op` must be a string"), rid)
    if op not in OPS:
        return RequestError(UnknownOp(f"no such op: {op[:40]!r}"), rid, op)
    try:
        _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        return RequestError(BadRequest(_field_message(str(exc))), rid, op)
    return RequestError(BadRequest("the request is malformed"), rid, op)  # pragma: no cover


def _field_message(text: str) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.to`' as 'field `to`: expected int, got str'."""
    match = _PATH.search(text)
    if match:
        field = match.group(1) or "request"
        detail = text[: match.start()]
    elif text.startswith("Object missing required field"):
        return "field " + text.removeprefix("Object missing required field ") + " is missing"
    else:
        field, detail = "request", text
    for pattern, sentence in _PATTERN_SENTENCES.items():
        if f"matching regex {pattern!r}" in detail:
            detail = sentence
            break
    detail = detail.replace("`", "")
    return f"field `{field}`: {detail[:1].lower()}{detail[1:]}"


def reply_ok(op: str, rid: str | int | None, body: dict[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"op": op}
    if rid is not None:
        msg["rid"] = rid
    msg["ok"] = True
    if body:
        msg.update(body)
    return _encoder.encode(msg) + b"\n"


def reply_error(op: str | None, rid: str | int | None, error: dict[str, Any]) -> bytes:
    msg: dict[str, Any] = {}
    if op is not None:
        msg["op"] = op
    if rid is not None:
        msg["rid"] = rid
    msg["ok"] = False
    msg["error"] = error
    return _encoder.encode(msg) + b"\n"


def event(name: str, body: dict[str, Any]) -> bytes:
    return _encoder.encode({"event": name, **body}) + b"\n"


def error_event(error: ChatError) -> bytes:
    return event("error", {"error": error.body()})


def op_of(request: Request) -> str:
    return request.__struct_config__.tag  # type: ignore[return-value]
