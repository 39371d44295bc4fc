"""Initial schema: conversations, members, messages, media.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
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
    op.create_table(
        "members",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("conv_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("last_read_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("joined_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "conv_id", "user_id", name="pk_members"),
    )
    op.create_index("ix_members_user", "members", ["tenant_id", "user_id"])
    op.create_table(
        "messages",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("conv_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("msg_id", sa.String(40), nullable=False),
        sa.Column("sender_id", sa.String(64), nullable=False),
        sa.Column("client_msg_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("content", _JSON, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "conv_id", "seq", name="pk_messages"),
        sa.UniqueConstraint(
            "tenant_id", "conv_id", "sender_id", "client_msg_id", name="uq_messages_client"
        ),
    )
    op.create_table(
        "media",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("conv_id", sa.String(64), nullable=False),
        sa.Column("uploader_id", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(128), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "key", name="pk_media"),
    )


def downgrade() -> None:
    op.drop_table("media")
    op.drop_table("messages")
    op.drop_index("ix_members_user", table_name="members")
    op.drop_table("members")
    op.drop_table("conversations")
