"""coturn provisioning: the tenant's shared secret in coturn's ``turn_secret`` table.

coturn (``--use-auth-secret``) accepts a TURN REST credential made with any
secret listed for its realm, and rereads the table on each allocation, so
adding or removing a row takes effect without a restart. Tenants share the
realm; each has its own row, so one tenant's secret is revoked alone.

The table lives in coturn's SQLite database (``TURN_DB``). coturn creates the
schema on first start; if it is not there yet, ``turnadmin`` (which creates
it the same way) is used when installed.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
from pathlib import Path

__all__ = ["TurnProvisioner", "TurnUnavailable"]


class TurnUnavailable(Exception):
    """coturn's database cannot be reached or is not initialised."""


class TurnProvisioner:
    def __init__(self, db_path: str, realm: str, *, timeout: float = 5.0) -> None:
        self._db = Path(db_path)
        self._realm = realm
        self._timeout = timeout

    @property
    def realm(self) -> str:
        return self._realm

    def _connect(self) -> sqlite3.Connection:
        if not self._db.exists():
            raise TurnUnavailable(f"coturn database {self._db} does not exist")
        try:
            return sqlite3.connect(self._db, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise TurnUnavailable(f"cannot open coturn database {self._db}: {exc}") from exc

    def _has_table(self, conn: sqlite3.Connection) -> bool:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'turn_secret'"
        ).fetchone()
        return row is not None

    def _ensure(self, secret: str) -> bool:
        conn = self._connect()
        try:
            if not self._has_table(conn):
                return self._ensure_with_turnadmin(secret)
            cur = conn.execute(
                "INSERT OR IGNORE INTO turn_secret (realm, value) VALUES (?, ?)",
                (self._realm, secret),
            )
            return cur.rowcount > 0
        except sqlite3.Error as exc:
            raise TurnUnavailable(f"coturn database {self._db}: {exc}") from exc
        finally:
            conn.close()

    def _ensure_with_turnadmin(self, secret: str) -> bool:
        turnadmin = shutil.which("turnadmin")
        if turnadmin is None:
            raise TurnUnavailable(
                f"coturn database {self._db} has no turn_secret table yet "
                "(start coturn once with it, or install turnadmin)"
            )
        proc = subprocess.run(
            [turnadmin, "-s", secret, "-r", self._realm, "-b", str(self._db)],
            capture_output=True,
            text=True,
            timeout=self._timeout * 4,
            check=False,
        )
        if proc.returncode != 0:
            raise TurnUnavailable(f"turnadmin failed ({proc.returncode}): {proc.stderr[-300:]}")
        return True

    def _remove(self, secret: str) -> bool:
        conn = self._connect()
        try:
            if not self._has_table(conn):
                return False
            cur = conn.execute(
                "DELETE FROM turn_secret WHERE realm = ? AND value = ?", (self._realm, secret)
            )
            return cur.rowcount > 0
        except sqlite3.Error as exc:
            raise TurnUnavailable(f"coturn database {self._db}: {exc}") from exc
        finally:
            conn.close()

    def _present(self, secret: str) -> bool:
        conn = self._connect()
        try:
            if not self._has_table(conn):
                return False
            row = conn.execute(
                "SELECT 1 FROM turn_secret WHERE realm = ? AND value = ?", (self._realm, secret)
            ).fetchone()
            return row is not None
        except sqlite3.Error as exc:
            raise TurnUnavailable(f"coturn database {self._db}: {exc}") from exc
        finally:
            conn.close()

    async def ensure(self, secret: str) -> bool:
        """Add the secret for the realm; ``True`` if it was not there."""
        return await asyncio.to_thread(self._ensure, secret)

    async def remove(self, secret: str) -> bool:
        """Revoke the secret; ``True`` if it was there."""
        return await asyncio.to_thread(self._remove, secret)

    async def present(self, secret: str) -> bool:
        return await asyncio.to_thread(self._present, secret)
