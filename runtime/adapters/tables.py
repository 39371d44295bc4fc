"""The runtime's table metadata (SQLAlchemy Core).

Shared by the store adapter, the Alembic migrations and the operator. Tables
carry ``tenant_id`` everywhere, even in PostgreSQL where each tenant also has
its own schema: a query that forgets its tenant still cannot match a row.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = ["conversations", "media", "members", "messages", "metadata"]

metadata = sa.MetaData()

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("tenant_id", sa.String(32), nullable=False),
    sa.Column("conv_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("name", sa.String(200)),
    sa.Column("direct_key", sa.String(140)),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_activity_at", _TS, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "conv_id", name="pk_conversations"),
    sa.UniqueConstraint("tenant_id", "direct_key", name="uq_conversations_direct"),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column("tenant_id", sa.String(32), nullable=False),
    sa.Column("conv_id", sa.String(64), nullable=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("last_read_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("joined_at", _TS, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "conv_id", "user_id", name="pk_members"),
    sa.Index("ix_members_user", "tenant_id", "user_id"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("tenant_id", sa.String(32), nullable=False),
    sa.Column("conv_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("msg_id", sa.String(40), nullable=False),
    sa.Column("sender_id", sa.String(64), nullable=False),
    sa.Column("client_msg_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("content", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    # History and gap sync read by (conv_id, seq): the primary key serves them.
    sa.PrimaryKeyConstraint("tenant_id", "conv_id", "seq", name="pk_messages"),
    # Idempotent sends: one row per (conversation, sender, client_msg_id).
    sa.UniqueConstraint(
        "tenant_id", "conv_id", "sender_id", "client_msg_id", name="uq_messages_client"
    ),
)

media = sa.Table(
    "media",
    metadata,
    sa.Column("tenant_id", sa.String(32), nullable=False),
    sa.Column("key", sa.String(512), nullable=False),
    sa.Column("conv_id", sa.String(64), nullable=False),
    sa.Column("uploader_id", sa.String(64), nullable=False),
    sa.Column("content_type", sa.String(128), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "key", name="pk_media"),
)
