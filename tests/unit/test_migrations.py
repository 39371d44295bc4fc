"""The Alembic migrations build exactly the schema the table metadata describes."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from imhub import migrations
from imhub.runtime.adapters import tables


def test_migrated_sqlite_schema_matches_metadata(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite"
    migrations.upgrade(f"sqlite+aiosqlite:///{db}")
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), tables.metadata)
        names = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"conversations", "members", "messages", "media", "alembic_version"} <= names
