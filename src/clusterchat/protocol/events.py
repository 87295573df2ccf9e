"""Server pushes (PROTOCOL.md section 5) and the shapes shared by replies and events."""

from __future__ import annotations

from typing import Any

from clusterchat.protocol.codec import encode, event
from clusterchat.storage.inbox import InboxMessage

_MESSAGE_PREFIX = b'{"event":"message","seq":'


def message_tail(message_id: int, sender_id: int, sender_name: str, to_user: int | None,
                 group_id: int | None, text: str, ts: int) -> bytes:
    """Everything of a message event after its seq, newline included."""
    body: dict[str, Any] = {"id": message_id, "from": {"id": sender_id, "name": sender_name}}
    if group_id is not None:
        body["group_id"] = group_id
    else:
        body["to"] = to_user
    body["text"] = text
    body["ts"] = ts
    return b"," + encode(body)[1:] + b"\n"


def message_frame(seq: int, tail: bytes) -> bytes:
    return _MESSAGE_PREFIX + str(seq).encode() + tail


def inbox_message_frame(m: InboxMessage) -> bytes:
    return message_frame(m.seq, message_tail(m.id, m.sender_id, m.sender_name, m.to_user, m.group_id, m.text, m.ts))


def message_event(m: InboxMessage) -> dict[str, Any]:
    """A message event as an object, for the `offline` of login and the `messages` of sync."""
    body: dict[str, Any] = {"event": "message", "seq": m.seq, "id": m.id,
                            "from": {"id": m.sender_id, "name": m.sender_name}}
    if m.group_id is not None:
        body["group_id"] = m.group_id
    else:
        body["to"] = m.to_user
    body["text"] = m.text
    body["ts"] = m.ts
    return body


def history_item(m: InboxMessage) -> dict[str, Any]:
    body = message_event(m)
    del body["event"], body["seq"]
    return body


def user_ref(user_id: int, name: str) -> dict[str, Any]:
    return {"id": user_id, "name": name}


def presence(user_id: int, online: bool) -> bytes:
    return event("presence", {"user_id": user_id, "online": online})


def kicked() -> bytes:
    return event("kicked", {"reason": "logged_in_elsewhere"})
