"""PostgreSQL provisioning: a schema and a login role that can use only that schema.

Runs with the operator's admin DSN (a role with CREATEROLE that may create
schemas in the database). Order, for each reconcile:

1. claim the tenant id: the comment on the schema names the owning
   ``ImTenant`` (uid, namespace/name). The claim is the ownership lock for the
   whole tenant (every backend), checked and taken atomically under an
   advisory lock keyed by the schema, so two objects with the same
   ``tenantId`` can never both hold it;
2. create or update the role (LOGIN, password from the tenant Secret);
3. set up the schema, owned by the admin, closed to ``PUBLIC``, usable (not
   writable: no ``CREATE``) by the tenant role;
4. apply the runtime migrations into the schema;
5. grant the tenant role DML on the tables and read-only on ``alembic_version``.

Every statement is idempotent, so the drift timer simply runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
from alembic.script import ScriptDirectory

from imhub import migrations
from imhub.runtime import tenancy

__all__ = ["AliveFn", "DatabaseConflict", "DatabaseProvisioner", "DatabaseUnavailable"]

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key serialising changes to shared ACLs (any constant
# works; this one is "imhub" in ASCII).
_SHARED_ACL_LOCK = 0x696D687562
# First key of the two-key advisory lock serialising claims of one schema (the
# second is hashtext(schema)); two-key locks never collide with one-key ones.
_CLAIM_LOCK = 0x696D68
_CLAIM_PREFIX = "imhub-tenant:"
_RETAINED = "retained"

# (namespace, name, uid) -> does that ImTenant still exist?
AliveFn = Callable[[str, str, str], Awaitable[bool]]


async def _assume_alive(namespace: str, name: str, uid: str) -> bool:
    return True


def claim_comment(owner_uid: str, owner_ref: str) -> str:
    """``imhub-tenant:<uid> <namespace>/<name>`` (the ref may be empty)."""
    return f"{_CLAIM_PREFIX}{owner_uid} {owner_ref}".rstrip()


def retained_comment(owner_ref: str) -> str:
    """``imhub-tenant:retained <namespace>/<name>``: only that object may adopt it."""
    return f"{_CLAIM_PREFIX}{_RETAINED} {owner_ref}".rstrip()


def parse_claim(comment: str | None) -> tuple[str, str] | None:
    """``(uid or "retained", "namespace/name" or "")``; ``None`` if not a claim."""
    if not comment or not comment.startswith(_CLAIM_PREFIX):
        return None
    head, _, ref = comment[len(_CLAIM_PREFIX) :].strip().partition(" ")
    return head, ref.strip()


class DatabaseUnavailable(Exception):
    """The database did not answer (down, unreachable, refused the login)."""


class DatabaseConflict(Exception):
    """The schema belongs to another ``ImTenant`` with the same tenant id."""


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` -> ``postgresql://...`` for asyncpg itself."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: scheme {parts.scheme!r}")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlalchemy_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseResult:
    schema: str
    role: str
    revision: str
    migrated: bool


class DatabaseProvisioner:
    def __init__(self, admin_url: str, *, timeout: float = 5.0) -> None:
        self._dsn = asyncpg_dsn(admin_url)
        self._sa_url = sqlalchemy_url(admin_url)
        self._timeout = timeout
        self._head_revision: str | None = None
        self._migrate_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self._timeout)

    async def _exec(self, conn: asyncpg.Connection, template: str, *args: str) -> None:
        """Run DDL built server-side by ``format()`` (%I identifiers, %L literals)."""
        sql = await conn.fetchval(f"SELECT format($${template}$$, {_params(len(args))})", *args)
        await conn.execute(sql)

    def _head(self) -> str:
        if self._head_revision is None:
            scripts = ScriptDirectory.from_config(migrations.alembic_config(self._sa_url))
            self._head_revision = scripts.get_current_head() or "base"
        return self._head_revision

    async def ensure(
        self,
        names: tenancy.TenantNames,
        *,
        password: str,
        owner_uid: str,
        owner_ref: str = "",
        alive: AliveFn = _assume_alive,
    ) -> DatabaseResult:
        """Claim the tenant id for ``owner_uid`` (``owner_ref`` = namespace/name), then provision.

        ``alive`` tells whether the ImTenant holding a foreign claim still
        exists; a claim whose holder is gone counts as retained for the
        holder's namespace/name.
        """
        schema, role = names.db_schema, names.db_role
        head = self._head()
        try:
            async with self._connect() as conn:
                await self._claim(conn, schema, owner_uid, owner_ref, alive)
                await self._ensure_role(conn, role, password)
                await self._ensure_schema(conn, schema, role)
                current = await self._revision(conn, schema)
            # Alembic only when behind: the drift timer runs this every minute.
            # One at a time: Alembic's context is process-global state.
            if current != head:
                async with self._migrate_lock:
                    await migrations.upgrade_async(self._sa_url, schema=schema)
            async with self._connect() as conn:
                await self._grant_tables(conn, schema, role)
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as exc:
            raise DatabaseUnavailable(f"PostgreSQL connection lost: {exc}") from exc
        except (DatabaseUnavailable, DatabaseConflict):
            raise
        except Exception as exc:
            # Alembic wraps driver errors in SQLAlchemy's; a refused connection
            # is still "unavailable", anything else is a real failure.
            if _is_connection_error(exc):
                raise DatabaseUnavailable(f"PostgreSQL not reachable: {exc}") from exc
            raise
        return DatabaseResult(schema=schema, role=role, revision=head, migrated=current != head)

    async def _revision(self, conn: asyncpg.Connection, schema: str) -> str | None:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'alembic_version'",
            schema,
        )
        if not exists:
            return None
        sql = await conn.fetchval(
            "SELECT format('SELECT version_num FROM %I.alembic_version', $1::text)", schema
        )
        value = await conn.fetchval(sql)
        return str(value) if value is not None else None

    async def _claim(
        self,
        conn: asyncpg.Connection,
        schema: str,
        owner_uid: str,
        owner_ref: str,
        alive: AliveFn,
    ) -> None:
        """Check and take the claim in one transaction, under the schema's claim lock."""
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _CLAIM_LOCK, schema
            )
            row = await conn.fetchrow(
                "SELECT obj_description(n.oid, 'pg_namespace') AS c "
                "FROM pg_namespace n WHERE nspname = $1",
                schema,
            )
            mine = claim_comment(owner_uid, owner_ref)
            if row is None:
                await self._exec(conn, "CREATE SCHEMA %I", schema)
            else:
                comment = row["c"]
                if comment == mine:
                    return
                await self._may_take(schema, comment, owner_uid, owner_ref, alive)
            await self._exec(conn, "COMMENT ON SCHEMA %I IS %L", schema, mine)

    async def _may_take(
        self, schema: str, comment: str | None, owner_uid: str, owner_ref: str, alive: AliveFn
    ) -> None:
        claim = parse_claim(comment)
        if claim is None:
            return  # never claimed (made before claims existed, or by hand)
        holder, ref = claim
        if holder == owner_uid:
            return  # ours, in the old format: rewritten
        release = (
            f"to hand it to another ImTenant, an admin sets "
            f"COMMENT ON SCHEMA {schema} IS 'imhub-tenant:retained <namespace>/<name>'"
        )
        if holder != _RETAINED:
            if not ref:
                raise DatabaseConflict(
                    f"schema {schema} belongs to another ImTenant (uid {holder}); "
                    f"tenantId must be unique across the cluster ({release} once it is gone)"
                )
            namespace, _, name = ref.partition("/")
            if await alive(namespace, name, holder):
                raise DatabaseConflict(
                    f"schema {schema} belongs to another ImTenant ({ref}, uid {holder}); "
                    "tenantId must be unique across the cluster"
                )
            # The holder is gone without releasing it: retained for its namespace/name.
        if not ref:
            raise DatabaseConflict(
                f"schema {schema} holds retained data of an unrecorded ImTenant; {release}"
            )
        if ref != owner_ref:
            raise DatabaseConflict(
                f"schema {schema} holds data retained by ImTenant {ref}; only an ImTenant "
                f"with that namespace/name may adopt it; {release}"
            )

    async def owns(self, names: tenancy.TenantNames, owner_uid: str) -> bool:
        """Does ``owner_uid`` hold the claim on the tenant id?"""
        async with self._connect() as conn:
            return await self._held_by(conn, names.db_schema, owner_uid)

    async def _held_by(self, conn: asyncpg.Connection, schema: str, owner_uid: str) -> bool:
        comment = await conn.fetchval(
            "SELECT obj_description(n.oid, 'pg_namespace') FROM pg_namespace n WHERE nspname = $1",
            schema,
        )
        claim = parse_claim(comment)
        return claim is not None and claim[0] == owner_uid

    async def _ensure_role(self, conn: asyncpg.Connection, role: str, password: str) -> None:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        verb = "ALTER" if exists else "CREATE"
        # The password is set on every pass: the Secret is the source of truth,
        # so a password changed by hand is put back.
        await self._exec(
            conn,
            f"{verb} ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
            "NOREPLICATION NOBYPASSRLS PASSWORD %L",
            role,
            password,
        )

    async def _ensure_schema(self, conn: asyncpg.Connection, schema: str, role: str) -> None:
        database = await conn.fetchval("SELECT current_database()")
        async with conn.transaction():
            # The grants below also rewrite shared catalog rows (the public
            # schema's and the database's ACL); concurrent passes for two
            # tenants would fail with "tuple concurrently updated".
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SHARED_ACL_LOCK)
            await self._exec(conn, "CREATE SCHEMA IF NOT EXISTS %I", schema)
            await self._exec(conn, "REVOKE ALL ON SCHEMA %I FROM PUBLIC", schema)
            # USAGE only: objects the tenant could create would run as the admin
            # in later migrations (CVE-2018-1058); the operator migrates, not it.
            await self._exec(conn, "REVOKE CREATE ON SCHEMA %I FROM %I", schema, role)
            await self._exec(conn, "GRANT USAGE ON SCHEMA %I TO %I", schema, role)
            # The tenant role sees its own schema and nothing else of ours:
            # nothing in public, and its search_path is its schema.
            await self._exec(conn, "REVOKE ALL ON SCHEMA public FROM %I", role)
            await self._exec(conn, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            await self._exec(conn, "GRANT CONNECT ON DATABASE %I TO %I", database, role)
            await self._exec(conn, "ALTER ROLE %I SET search_path = %I", role, schema)

    async def _grant_tables(self, conn: asyncpg.Connection, schema: str, role: str) -> None:
        async with conn.transaction():
            await self._exec(
                conn,
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I",
                schema,
                role,
            )
            await self._exec(
                conn,
                "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO %I",
                schema,
                role,
            )
            await self._exec(
                conn,
                "ALTER DEFAULT PRIVILEGES IN SCHEMA %I "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I",
                schema,
                role,
            )
            has_version_table = await conn.fetchval(
                "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'alembic_version'",
                schema,
            )
            if has_version_table:
                await self._exec(
                    conn,
                    "REVOKE INSERT, UPDATE, DELETE ON TABLE %I.alembic_version FROM %I",
                    schema,
                    role,
                )

    async def retain(self, names: tenancy.TenantNames, owner_uid: str, owner_ref: str) -> bool:
        """Keep the data, lock the door: the role can no longer log in.

        Only the claim holder does this (``False`` otherwise, nothing touched);
        the schema is then marked retained for ``owner_ref`` (namespace/name),
        the only ImTenant that may adopt it again.
        """
        schema = names.db_schema
        async with self._connect() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _CLAIM_LOCK, schema
            )
            if not await self._held_by(conn, schema, owner_uid):
                return False
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", names.db_role):
                await self._exec(conn, "ALTER ROLE %I NOLOGIN", names.db_role)
                await _terminate(conn, names.db_role)
            await self._exec(
                conn, "COMMENT ON SCHEMA %I IS %L", schema, retained_comment(owner_ref)
            )
        return True

    async def drop(self, names: tenancy.TenantNames, owner_uid: str | None = None) -> bool:
        """Drop the schema with everything in it, then the role.

        With ``owner_uid``, only if that ImTenant holds the claim (``False``
        otherwise, nothing touched).
        """
        async with self._connect() as conn:
            if owner_uid is not None and not await self._held_by(conn, names.db_schema, owner_uid):
                return False
            role_exists = await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", names.db_role
            )
            if role_exists:
                await self._exec(conn, "ALTER ROLE %I NOLOGIN", names.db_role)
                await _terminate(conn, names.db_role)
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SHARED_ACL_LOCK)
                await self._exec(conn, "DROP SCHEMA IF EXISTS %I CASCADE", names.db_schema)
                if role_exists:
                    # DROP OWNED also removes the role's grants in this database.
                    await self._exec(conn, "DROP OWNED BY %I", names.db_role)
                    await self._exec(conn, "DROP ROLE IF EXISTS %I", names.db_role)
        return True


async def _terminate(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
    )


def _params(count: int) -> str:
    return ", ".join(f"${i}::text" for i in range(1, count + 1)) if count else "''"


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, OSError | asyncio.TimeoutError | asyncpg.PostgresConnectionError
        ) or type(current).__name__ in ("CannotConnectNowError", "ConnectionDoesNotExistError"):
            return True
        current = current.__cause__ or current.__context__
    return False
