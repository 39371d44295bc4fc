"""Ports: what the services need from the outside world, as typing Protocols.

Services depend on these and never on an adapter. Each port has an embedded
adapter (``imhub serve``) and a production adapter, and both keep the same
guarantees, written on each method below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from imhub.runtime import models

__all__ = [
    "Bus",
    "Cache",
    "Consumer",
    "ObjectStore",
    "Record",
    "Store",
    "UploadTicket",
    "WebhookSender",
]


# -- bus ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str
    value: bytes


class Consumer(Protocol):
    async def poll(self, max_records: int, timeout: float) -> list[Record]:
        """Up to ``max_records`` records, in offset order within each partition."""

    async def commit(self, records: Sequence[Record]) -> None:
        """Mark everything up to and including these records as done."""

    async def close(self) -> None: ...


class Bus(Protocol):
    """A partitioned log. Records with the same key land in the same partition
    and are consumed in the order they were produced."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Flush what was produced, then release connections."""

    async def ensure_topics(self, topics: Sequence[str]) -> None: ...

    async def produce(self, topic: str, key: str, value: bytes) -> None:
        """Return once the bus has durably accepted the record; raise
        :class:`~imhub.runtime.errors.Unavailable` if it cannot."""

    def consumer(self, topics: Sequence[str], group: str, *, from_latest: bool = False) -> Consumer:
        """A consumer in ``group``. ``from_latest`` starts a new group at the end
        of the log (gateways want only what happens from now on)."""


# -- database -------------------------------------------------------------------


class Store(Protocol):
    """Tenant-scoped persistence. Every method takes the tenant first and never
    reads or writes another tenant's rows."""

    @property
    def write_concurrency(self) -> int:
        """How many write transactions to run concurrently."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    # conversations
    async def create_conversation(
        self,
        tenant_id: str,
        *,
        conv_type: str,
        member_ids: Sequence[str],
        created_by: str,
        name: str | None,
        direct_key: str | None,
    ) -> tuple[models.Conversation, bool]:
        """Create it, or for a direct conversation return the existing one.
        The flag says whether it was created."""

    async def get_conversation(
        self, tenant_id: str, conv_id: str
    ) -> models.Conversation | None: ...

    async def list_conversations(
        self, tenant_id: str, user_id: str, *, before: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[models.Conversation, int]]:
        """The user's conversations, newest activity first, with the unread count."""

    async def add_members(self, tenant_id: str, conv_id: str, user_ids: Sequence[str]) -> list[str]:
        """Add members; return the ids that were not members before."""

    async def remove_member(self, tenant_id: str, conv_id: str, user_id: str) -> bool: ...

    async def members(self, tenant_id: str, conv_id: str) -> list[models.Member]: ...

    # messages
    async def max_seq(self, tenant_id: str, conv_id: str) -> int:
        """The highest stored seq of the conversation (0 when empty)."""

    async def find_by_client_ids(
        self, tenant_id: str, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], models.Message]:
        """Already stored messages by ``(conv_id, sender_id, client_msg_id)``."""

    async def load_batch(
        self, tenant_id: str, conv_ids: Sequence[str], keys: Sequence[tuple[str, str, str]]
    ) -> tuple[dict[str, list[models.Member]], dict[tuple[str, str, str], models.Message]]:
        """Members of each conversation and ``find_by_client_ids``, in one round trip."""

    async def insert_messages(
        self, tenant_id: str, batches: Mapping[str, Sequence[models.NewMessage]]
    ) -> None:
        """Store the messages of several conversations in one transaction, move
        each conversation's last seq and each sender's read point. Raise
        :class:`~imhub.runtime.errors.Conflict` (and store nothing) when a seq
        or ``(sender_id, client_msg_id)`` is already taken."""

    async def history(
        self,
        tenant_id: str,
        conv_id: str,
        *,
        before_seq: int | None,
        after_seq: int | None,
        limit: int,
    ) -> list[models.Message]:
        """Messages in ascending seq order: the newest ``limit`` below
        ``before_seq``, or the oldest ``limit`` above ``after_seq``."""

    async def mark_read(
        self, tenant_id: str, conv_id: str, user_id: str, seq: int
    ) -> tuple[int, bool]:
        """Move the read point up to ``seq`` (clamped to the last seq); return the
        read point and whether it moved. Never moves backwards. Raise
        :class:`~imhub.runtime.errors.NotFound` for a non-member."""

    async def unread_count(self, tenant_id: str, conv_id: str, user_id: str) -> int: ...

    # media
    async def record_media(self, tenant_id: str, obj: models.MediaObject) -> None: ...

    async def get_media(self, tenant_id: str, key: str) -> models.MediaObject | None: ...


# -- cache ----------------------------------------------------------------------


class Cache(Protocol):
    """Fast shared state: seq allocation, presence and small TTL'd values.
    Losing it (flush, restart) must never break an invariant."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def allocate_seq(
        self,
        tenant_id: str,
        conv_id: str,
        count: int,
        stored_max: Callable[[], Awaitable[int]],
    ) -> int:
        """Reserve ``count`` consecutive seqs and return the first. When the
        counter is missing it is rebuilt from ``stored_max()`` first, so it never
        hands out a value at or below a stored seq."""

    async def allocate_seqs(
        self,
        tenant_id: str,
        counts: Mapping[str, int],
        stored_max: Callable[[str], Awaitable[int]],
    ) -> dict[str, int]:
        """:meth:`allocate_seq` for several conversations at once (one round trip
        where the backend allows); ``stored_max(conv_id)`` as there."""

    async def reset_seq(self, tenant_id: str, conv_id: str, floor: int) -> None:
        """Raise the counter to at least ``floor`` (after a conflict)."""

    async def release_seq(self, tenant_id: str, conv_id: str, first: int, count: int) -> None:
        """Give back the block ``first..first+count-1`` if nothing was allocated
        after it (a failed write), so an outage leaves no hole."""

    async def set_online(
        self, tenant_id: str, user_id: str, instance_id: str, ttl: float
    ) -> None: ...

    async def set_offline(self, tenant_id: str, user_id: str, instance_id: str) -> None: ...

    async def online_instances(self, tenant_id: str, user_id: str) -> list[str]: ...

    async def get_json(self, tenant_id: str, key: str) -> Any | None: ...

    async def set_json(self, tenant_id: str, key: str, value: Any, ttl: float) -> None: ...

    async def delete(self, tenant_id: str, key: str) -> None: ...


# -- object storage -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UploadTicket:
    method: str  # "PUT" or "POST"
    url: str
    fields: dict[str, str]  # form fields for POST
    headers: dict[str, str]  # headers the client must send with PUT
    expires_at: datetime


class ObjectStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ensure_tenant(self, tenant_id: str) -> None: ...

    async def presign_upload(
        self, tenant_id: str, key: str, *, content_type: str, size: int, expires_in: int
    ) -> UploadTicket:
        """A URL that accepts exactly one object of at most ``size`` bytes of
        ``content_type`` at ``key`` until it expires."""

    async def presign_download(
        self, tenant_id: str, key: str, *, expires_in: int, content_type: str | None = None
    ) -> str:
        """A URL that serves ``key`` until it expires; types a browser could run
        as a page are served as attachments."""


# -- webhooks -------------------------------------------------------------------


class WebhookSender(Protocol):
    def submit(self, url: str, secret: str | None, event: dict[str, Any]) -> bool:
        """Queue one webhook call without waiting; ``False`` when the queue is
        full (the event is dropped and counted, never blocking the caller)."""
