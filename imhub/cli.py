"""The ``imhub`` command line.

Exit codes: 0 ok, 2 usage or configuration error (one line on stderr, never a
traceback), 1 anything else that went wrong at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy.exc
import yaml
from pydantic import ValidationError

from imhub.runtime import errors

__all__ = ["main"]

logger = logging.getLogger("imhub.cli")


class UsageError(Exception):
    """A bad flag, file or setting: reported in one line with exit code 2."""


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from imhub.runtime import settings

    values: dict[str, Any] = {}
    for name in (
        "host",
        "port",
        "data_dir",
        "tenants_file",
        "database_url",
        "instance_id",
        "kafka_bootstrap",
        "redis_url",
        "public_url",
        "log_level",
    ):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    values.update(extra)
    try:
        return settings.Settings(**values)
    except ValidationError as exc:
        raise UsageError(f"bad setting {_describe(exc)}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read the config file: {str(exc).splitlines()[0]}") from None


def _describe(exc: ValidationError) -> str:
    """The first few problems, each with where it is: one line for a human."""
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _registry(config: Any, *, demo: bool = False, demo_capable: bool = False) -> Any:
    from imhub.runtime import tenants

    tenants_file = config.tenants_file
    default_file = Path(config.data_dir) / "tenants.yaml"
    if demo and tenants_file is None:
        if not default_file.exists():
            default_file.parent.mkdir(parents=True, exist_ok=True)
            doc = {"tenants": [tenants.demo_tenant("demo")]}
            fd = os.open(default_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(doc, fh, sort_keys=False)
        tenants_file = default_file
    elif tenants_file is None and default_file.exists():
        tenants_file = default_file
    try:
        registry = tenants.load_tenants(tenants_file)
    except FileNotFoundError as exc:
        raise UsageError(f"tenants file not found: {exc.filename}") from None
    except OSError as exc:
        raise UsageError(f"cannot read tenants file {tenants_file}: {exc.strerror}") from None
    except ValidationError as exc:
        raise UsageError(f"bad tenant configuration: {_describe(exc)}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"bad tenant configuration: {str(exc).splitlines()[0]}") from None
    if demo and registry.get("demo") is None:
        raise UsageError("--demo needs a tenant 'demo' in the tenants file")
    if not len(registry):
        hint = ", or use --demo" if demo_capable else ""
        raise UsageError(
            "no tenants configured: pass --tenants FILE or set IMHUB_TENANTS or "
            f"IMHUB_TENANT_ID{hint}"
        )
    return registry


async def _seed_demo(config: Any, registry: Any) -> None:
    """Give the demo users a shared group and direct chats (once)."""
    from imhub import migrations
    from imhub.runtime.adapters import store as store_adapter
    from imhub.runtime.gateway.app import DEMO_TENANT, DEMO_USERS

    url = config.effective_database_url()
    if url.startswith("sqlite"):
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        await migrations.upgrade_async(url)
    else:
        await migrations.upgrade_async(url, schema=registry.get(DEMO_TENANT).names.db_schema)
    db = store_adapter.SqlStore(store_adapter.make_engine(url))
    try:
        if await db.list_conversations(DEMO_TENANT, "alice", before=None, limit=1):
            return
        await db.create_conversation(
            DEMO_TENANT,
            conv_type="group",
            member_ids=list(DEMO_USERS),
            created_by="alice",
            name="Demo group",
            direct_key=None,
        )
        await db.create_conversation(
            DEMO_TENANT,
            conv_type="direct",
            member_ids=["alice", "bob"],
            created_by="alice",
            name=None,
            direct_key="alice\nbob",
        )
    finally:
        await db.close()


def _run_server(config: Any, registry: Any, roles: Sequence[str], *, demo: bool = False) -> int:
    import uvicorn

    from imhub.runtime import observability, wiring
    from imhub.runtime.gateway import app as app_module

    observability.configure_logging(config.log_level, config.log_format)
    try:
        runtime = wiring.Runtime(config, registry, roles=roles, demo=demo)
    except (ValueError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise UsageError(f"bad database URL or setting: {str(exc).splitlines()[0]}") from None
    application = app_module.create_app(runtime)
    server = uvicorn.Server(
        uvicorn.Config(
            application,
            host=config.host,
            port=config.port,
            ws="websockets-sansio",
            ws_max_size=config.max_frame_bytes,
            ws_ping_interval=20,
            ws_ping_timeout=20,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    if demo:
        url = config.effective_public_url()
        print(f"imhub demo: open {url}/demo (users: alice, bob, carol)", file=sys.stderr)
        print(
            f"  token: imhub token --tenant demo --user alice --data-dir {config.data_dir}",
            file=sys.stderr,
        )
    import gc

    # Collect the young generation less often: a chat server allocates many
    # short-lived frames, and full collections over a large heap stall every
    # connection at once.
    gc.set_threshold(50_000, 20, 100)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on bind or lifespan start-up failure
        print(
            f"imhub: the server failed to start (exit {exc.code}); see the log above",
            file=sys.stderr,
        )
        return 1
    if not server.started:
        print("imhub: the server failed to start; see the log above", file=sys.stderr)
        return 1
    return 0


# -- commands ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _settings(args)
    _prepare_data_dir(config.data_dir)
    registry = _registry(config, demo=args.demo, demo_capable=True)
    if args.demo:
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                "imhub: warning: --demo hands out tokens for alice, bob and carol at "
                "/demo/token to anyone who can reach this address",
                file=sys.stderr,
            )
        try:
            asyncio.run(_seed_demo(config, registry))
        except (OSError, errors.ImhubError, sqlalchemy.exc.SQLAlchemyError) as exc:
            raise UsageError(f"cannot prepare the demo data: {str(exc).splitlines()[0]}") from None
    return _run_server(
        config, registry, ("gateway", "message-service", "rtc-service"), demo=args.demo
    )


def _prepare_data_dir(path: Path) -> None:
    """Create the data directory private to this user (it holds messages and keys)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create data directory {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(f"data directory {path} is not a directory")


def _cmd_role(role: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        config = _settings(args)
        registry = _registry(config)
        return _run_server(config, registry, (role,))

    return run


def cmd_token(args: argparse.Namespace) -> int:
    from imhub.runtime import auth, errors

    config = _settings(args)
    registry = _registry(config)
    tenant = registry.get(args.tenant)
    if tenant is None:
        raise UsageError(f"unknown tenant {args.tenant!r} (known: {', '.join(registry.ids())})")
    try:
        token, _ = auth.mint_token(tenant, args.user, ttl=args.ttl)
    except errors.ImhubError as exc:
        raise UsageError(exc.message) from None
    except ValueError as exc:  # no HS256 key to sign with
        raise UsageError(str(exc)) from None
    print(token)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from imhub import migrations
    from imhub.runtime import tenancy

    config = _settings(args)
    url = config.effective_database_url()
    if url.startswith("sqlite"):
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        migrations.upgrade(url)
        print(f"migrated {url}")
        return 0
    schemas: list[str] = []
    if args.schema:
        schemas.append(args.schema)
    for tenant_id in args.tenant or []:
        try:
            schemas.append(tenancy.names_for(tenant_id).db_schema)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not schemas:
        schemas = [t.names.db_schema for t in _registry(config)]
    for schema in schemas:
        try:
            migrations.upgrade(url, schema=schema)
        except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
            print(
                f"imhub: migrating schema {schema} failed: {str(exc).splitlines()[0]}",
                file=sys.stderr,
            )
            return 1
        print(f"migrated schema {schema}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from imhub import bench

    return bench.main(args)


def cmd_operator(args: argparse.Namespace) -> int:
    try:
        from imhub.operator import main as operator_main
    except ImportError as exc:
        raise UsageError(f"the operator needs the 'operator' extra: {exc}") from None
    return int(operator_main.run(args))


# -- parser -----------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, server: bool = True) -> None:
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="data directory (./.imhub)")
    p.add_argument("--tenants", dest="tenants_file", type=Path, help="tenants YAML file")
    p.add_argument("--database-url", dest="database_url", help="SQLAlchemy URL (default SQLite)")
    if server:
        p.add_argument("--host", help="listen address (127.0.0.1)")
        p.add_argument("--port", type=int, help="listen port (8080)")
        p.add_argument("--kafka-bootstrap", dest="kafka_bootstrap")
        p.add_argument("--redis-url", dest="redis_url")
        p.add_argument("--instance-id", dest="instance_id")
        p.add_argument("--public-url", dest="public_url")
        p.add_argument("--log-level", dest="log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imhub", description="imhub: multi-tenant chat")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="all roles in one process on the embedded default")
    _common(p)
    p.add_argument("--demo", action="store_true", help="add tenant 'demo' and the demo page")
    p.set_defaults(func=cmd_serve)

    for role in ("gateway", "message-service", "rtc-service"):
        p = sub.add_parser(role, help=f"run the {role} role on the production backends")
        _common(p)
        p.set_defaults(func=_cmd_role(role))

    p = sub.add_parser("token", help="print a signed user token")
    _common(p, server=False)
    p.add_argument("--tenant", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=int, default=3600, help="seconds (3600)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("migrate", help="apply database migrations")
    _common(p, server=False)
    p.add_argument("--schema", help="PostgreSQL schema to migrate")
    p.add_argument("--tenant", action="append", help="migrate this tenant's schema (repeatable)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("bench", help="load generator; prints msgs/s and latencies")
    from imhub import bench

    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces")
    p.add_argument("--standalone", action="store_true", default=True)
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"imhub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
