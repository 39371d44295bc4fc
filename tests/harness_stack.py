"""The production shape as a test target: ``scripts/stack`` on the session's backends.

Two gateways, the message service and the RTC service run as separate
processes over PostgreSQL, Redis, Kafka, S3 and coturn. The backends are the
ones of the session ``services`` fixture (``scripts/stack --services-dir``), so
every stack in a session shares one set of servers; each stack has its own
tenants and instance ids, so stacks never see each other's data or consumer
group members. Crash tests kill and restart any part through the same script
people use (``scripts/stack start NAME``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.harness import REPO, Target
from tests.realservices import ServiceSet, parse_env

__all__ = ["BACKENDS", "RUNTIME_PARTS", "StackTarget"]

STACK = REPO / "scripts" / "stack"
BACKENDS = ("postgres", "redis", "kafka", "s3", "coturn")
RUNTIME_PARTS = ("message-service", "rtc-service", "gateway-1", "gateway-2")


class StackTarget(Target):
    """``scripts/stack`` with its own directory, tenants file and instance ids.

    Args:
        base_dir: the stack's directory (pids, logs, tenants, runtime data).
        services: the session's backends; ``None`` gives the stack its own,
            started under ``base_dir``.
        tenants: tenant documents (``tests.harness.make_tenants``).
        settings: extra runtime settings, passed as ``IMHUB_<NAME>`` to every
            imhub process (also when one is started again).
    """

    kind = "stack"

    def __init__(
        self,
        base_dir: Path,
        services: ServiceSet | None,
        tenants: Sequence[dict[str, Any]],
        **settings: Any,
    ) -> None:
        self.base_dir = base_dir
        self.services = services
        self.services_dir = services.base if services is not None else base_dir
        self.tenants = {t["tenant_id"]: t for t in tenants}
        self.prefix = f"s{secrets.token_hex(3)}-"
        base_dir.mkdir(parents=True, exist_ok=True)
        self.tenants_source = base_dir / "tenants.in.yaml"
        self.tenants_source.write_text(yaml.safe_dump({"tenants": list(tenants)}))
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IMHUB_")},
            **{f"IMHUB_{k.upper()}": _env_value(v) for k, v in settings.items()},
        }
        self.env: dict[str, str] = {}
        self.gateway_urls: list[str] = []

    # -- whole stack ------------------------------------------------------------------

    def _stack(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [str(STACK), *args, "--dir", str(self.base_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env,
            cwd=str(REPO),
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"scripts/stack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return proc.stdout

    def start(self) -> None:
        if self.services is not None:
            # Registered with the session, so they are stopped at its end.
            for name in BACKENDS:
                self.services.get(name)
        out = self._stack(
            "up",
            "--tenants",
            str(self.tenants_source),
            "--services-dir",
            str(self.services_dir),
            "--instance-prefix",
            self.prefix,
            timeout=900,
        )
        self.env = parse_env(out)
        self.gateway_urls = self.env["GATEWAY_URLS"].split(",")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._stack("down", timeout=120)

    async def restart(self) -> None:
        """``kill -9`` the message service, the RTC service and both gateways, then
        start them again and wait until each is ready."""
        for name in RUNTIME_PARTS:
            self.kill(name)
        await asyncio.gather(*(self.start_part_async(name) for name in RUNTIME_PARTS))

    # -- one part ---------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        root = self.services_dir if name in BACKENDS else self.base_dir
        return root / "pids" / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and _alive(pid)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the part (default ``kill -9``) and wait until it is gone."""
        pid = self.pid(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)

    def start_part(self, name: str) -> None:
        """Start one part again (backend or imhub process) and wait until it is ready."""
        self._stack("start", name, timeout=300)

    async def start_part_async(self, name: str) -> None:
        await asyncio.to_thread(self.start_part, name)

    def stop_part(self, name: str) -> None:
        """Stop one part cleanly (SIGTERM, or the backend's own stop)."""
        self._stack("stop", name, timeout=180)

    def log(self, name: str) -> str:
        root = self.services_dir if name in BACKENDS else self.base_dir
        path = root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def database_url(self) -> str:
        """asyncpg/SQLAlchemy form."""
        return self.env["IMHUB_DATABASE_URL"]


def _env_value(value: Any) -> str:
    # pydantic-settings reads lists and mappings from the environment as JSON.
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
