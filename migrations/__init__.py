"""Alembic migrations for the runtime schema (one schema per tenant on PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade", "upgrade_async"]

HERE = Path(__file__).resolve().parent


def alembic_config(url: str, *, schema: str | None = None) -> Config:
    from imhub.runtime.adapters.store import normalize_url

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = normalize_url(url)
    cfg.attributes["schema"] = schema
    return cfg


def upgrade(url: str, *, schema: str | None = None, revision: str = "head") -> None:
    """Apply migrations up to ``revision``; creates ``schema`` first on PostgreSQL."""
    command.upgrade(alembic_config(url, schema=schema), revision)


async def upgrade_async(url: str, *, schema: str | None = None) -> None:
    # Alembic drives its own event loop in env.py, so run it on a thread.
    await asyncio.to_thread(upgrade, url, schema=schema)
