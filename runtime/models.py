"""Domain records shared by services, ports and adapters (plain data, no I/O)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

__all__ = ["Conversation", "MediaObject", "Member", "Message", "NewMessage"]


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    role: str  # "owner" | "member"
    last_read_seq: int
    joined_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    msg_id: str
    conv_id: str
    seq: int
    sender_id: str
    type: str
    content: dict[str, Any]
    client_msg_id: str
    created_at: datetime

    def to_wire(self) -> dict[str, Any]:
        return {
            "msg_id": self.msg_id,
            "conv_id": self.conv_id,
            "seq": self.seq,
            "sender_id": self.sender_id,
            "type": self.type,
            "content": self.content,
            "client_msg_id": self.client_msg_id,
            "created_at": self.created_at.isoformat(),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class NewMessage:
    """A message about to be stored: seq and id are already assigned."""

    msg_id: str
    seq: int
    sender_id: str
    type: str
    content: dict[str, Any]
    client_msg_id: str
    created_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    conv_id: str
    type: str  # "direct" | "group"
    name: str | None
    created_by: str
    created_at: datetime
    last_seq: int
    last_activity_at: datetime
    members: tuple[Member, ...] = ()
    last_message: Message | None = None

    def member(self, user_id: str) -> Member | None:
        return next((m for m in self.members if m.user_id == user_id), None)

    def member_ids(self) -> list[str]:
        return [m.user_id for m in self.members]


@dataclasses.dataclass(frozen=True, slots=True)
class MediaObject:
    key: str
    conv_id: str
    uploader_id: str
    content_type: str
    size: int
    created_at: datetime
