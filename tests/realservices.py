"""Start the real backend servers for tests with the project's own scripts.

Each service is started once per test session, on demand, by
``scripts/services/NAME start --dir D`` and stopped at the end. The scripts
print ``KEY=value`` lines, which come back here as a dict.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["REPO", "ServiceSet"]

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "services"


def parse_env(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if key.isidentifier() and key.isupper():
                out[key] = value
    return out


class ServiceSet:
    """Services started under one directory; ``stop_all`` stops what was started."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.env: dict[str, dict[str, str]] = {}

    def _run(self, name: str, action: str, timeout: float = 900) -> str:
        proc = subprocess.run(
            [str(SCRIPTS / name), action, "--dir", str(self.base)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"scripts/services/{name} {action} failed ({proc.returncode}):\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def start(self, name: str) -> dict[str, str]:
        """Start (or restart after a kill) and return its KEY=value lines."""
        env = parse_env(self._run(name, "start"))
        self.env[name] = env
        return env

    def get(self, name: str) -> dict[str, str]:
        return self.env[name] if name in self.env else self.start(name)

    def stop(self, name: str) -> None:
        self._run(name, "stop", timeout=120)

    def stop_all(self) -> None:
        for name in reversed(list(self.env)):
            try:
                self.stop(name)
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"warning: stopping {name} failed: {exc}")
