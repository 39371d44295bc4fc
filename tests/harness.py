"""Running imhub for tests: a real server process on loopback and a real WS client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
import websockets
import yaml

__all__ = ["Client", "EmbeddedServer", "Target", "free_port", "make_tenants", "wait_http"]

REPO = Path(__file__).resolve().parent.parent
IMHUB = [sys.executable, "-m", "imhub"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tenants(*tenant_ids: str, **limits: Any) -> list[dict[str, Any]]:
    docs = []
    for tid in tenant_ids:
        doc: dict[str, Any] = {
            "tenant_id": tid,
            "api_key": secrets.token_urlsafe(24),
            "keys": [{"kid": "k1", "alg": "HS256", "secret": secrets.token_urlsafe(32)}],
            "turn_secret": secrets.token_urlsafe(16),
        }
        if limits:
            doc["limits"] = limits
        docs.append(doc)
    return docs


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready: {last}")


class Target:
    """A running imhub deployment that the protocol suite talks to."""

    kind = "abstract"
    gateway_urls: list[str]
    tenants: dict[str, dict[str, Any]]

    def http(self, index: int = 0) -> str:
        return self.gateway_urls[index % len(self.gateway_urls)]

    def ws(self, index: int = 0) -> str:
        return self.http(index).replace("http://", "ws://", 1) + "/v1/im/ws"

    def token(self, tenant_id: str, user_id: str, *, ttl: int = 3600, **extra: Any) -> str:
        key = self.tenants[tenant_id]["keys"][0]
        now = int(time.time())
        claims = {"sub": user_id, "tenant_id": tenant_id, "iat": now, "exp": now + ttl, **extra}
        return jwt.encode(claims, key["secret"], algorithm="HS256", headers={"kid": key["kid"]})

    def rest(self, tenant_id: str, user_id: str, index: int = 0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.http(index),
            headers={"Authorization": f"Bearer {self.token(tenant_id, user_id)}"},
            timeout=10,
        )

    async def restart(self) -> None:
        raise NotImplementedError


class EmbeddedServer(Target):
    """``imhub serve`` in a subprocess with its own data dir and tenants file."""

    kind = "embedded"

    def __init__(self, data_dir: Path, tenants: Sequence[dict[str, Any]], **settings: Any) -> None:
        self.data_dir = data_dir
        self.tenants = {t["tenant_id"]: t for t in tenants}
        self.port = free_port()
        self.gateway_urls = [f"http://127.0.0.1:{self.port}"]
        self.tenants_file = data_dir / "tenants.yaml"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.tenants_file.write_text(yaml.safe_dump({"tenants": list(tenants)}))
        self.env = {**os.environ, **{f"IMHUB_{k.upper()}": str(v) for k, v in settings.items()}}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *IMHUB,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--tenants",
                str(self.tenants_file),
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=str(REPO),
        )
        wait_http(self.http() + "/readyz", proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    async def restart(self) -> None:
        await asyncio.to_thread(self.stop, signal.SIGKILL)
        await asyncio.to_thread(self.start)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Client:
    """A WebSocket client that speaks the imhub protocol and records what it gets."""

    _ids = itertools.count(1)

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.acks: dict[str | None, asyncio.Future[dict[str, Any]]] = {}
        self.orphan_acks: list[dict[str, Any]] = []
        self._backlog: list[dict[str, Any]] = []
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, token: str | None = None, **kwargs: Any) -> Client:
        ws = await websockets.connect(url, max_size=None, **kwargs)
        client = cls(ws)
        if token is not None:
            ack = await client.request("authorize", {"token": token})
            if not ack["success"]:
                raise AssertionError(f"authorize failed: {ack}")
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["event"] == "ack":
                    ack_id = frame["payload"].get("for_ack_id")
                    fut = self.acks.get(ack_id)
                    if fut is not None and not fut.done():
                        fut.set_result(frame["payload"])
                    else:
                        self.orphan_acks.append(frame["payload"])
                else:
                    await self.events.put(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, self.ws.close_reason or ""))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def request(
        self, event: str, payload: dict[str, Any], *, timeout: float = 10.0
    ) -> dict[str, Any]:
        ack_id = f"a{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.acks[ack_id] = fut
        await self.ws.send(json.dumps({"event": event, "payload": payload, "ack_id": ack_id}))
        return await asyncio.wait_for(fut, timeout)

    async def send_text(
        self, conv_id: str, text: str, client_msg_id: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "send_message",
            {
                "conv_id": conv_id,
                "client_msg_id": client_msg_id or secrets.token_hex(8),
                "type": "text",
                "content": {"text": text},
            },
        )

    async def next_event(self, name: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next event called ``name``; events of other kinds wait their turn."""
        for index, frame in enumerate(self._backlog):
            if name is None or frame["event"] == name:
                return self._backlog.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(name)
            frame = await asyncio.wait_for(self.events.get(), remaining)
            if name is None or frame["event"] == name:
                return frame
            self._backlog.append(frame)

    async def collect(self, name: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out.append(
                (await self.next_event(name, max(0.01, deadline - time.monotonic())))["payload"]
            )
        return out

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)
