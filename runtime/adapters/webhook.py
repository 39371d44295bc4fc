"""Webhook delivery over HTTP (httpx), in the background, with retries.

Each call is a ``POST`` of the JSON event. When the tenant has a webhook
secret, ``X-Imhub-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`` lets
the receiver check origin and freshness. Failed calls are retried with
exponential backoff (tenacity) for up to about a minute; a full queue drops
new events and counts them, it never blocks the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
import orjson
import tenacity
from prometheus_client import Counter

__all__ = ["HttpWebhookSender", "sign"]

logger = logging.getLogger(__name__)

WEBHOOKS = Counter("imhub_webhooks_total", "Webhook calls by outcome", ["result"])


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class _RetryableStatus(Exception):
    pass


class HttpWebhookSender:
    def __init__(
        self,
        *,
        queue_size: int = 10_000,
        workers: int = 4,
        timeout: float = 5.0,
        max_attempts: int = 6,
    ) -> None:
        self._queue: asyncio.Queue[tuple[str, str | None, dict[str, Any]]] = asyncio.Queue(
            queue_size
        )
        self._workers = workers
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()

    def submit(self, url: str, secret: str | None, event: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait((url, secret, event))
        except asyncio.QueueFull:
            WEBHOOKS.labels("dropped").inc()
            return False
        return True

    async def _work(self) -> None:
        while True:
            url, secret, event = await self._queue.get()
            try:
                await self._deliver(url, secret, event)
                WEBHOOKS.labels("delivered").inc()
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any failure
                WEBHOOKS.labels("failed").inc()
                logger.warning(
                    "webhook gave up after retries: %s",
                    type(exc).__name__,
                    extra={"tenant_id": event.get("tenant_id")},
                )

    async def _deliver(self, url: str, secret: str | None, event: dict[str, Any]) -> None:
        assert self._client is not None
        body = orjson.dumps(event)
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=20),
            retry=tenacity.retry_if_exception_type((httpx.TransportError, _RetryableStatus)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                headers = {"Content-Type": "application/json", "User-Agent": "imhub-webhook/1"}
                if secret:
                    headers["X-Imhub-Signature"] = sign(secret, body, int(time.time()))
                resp = await self._client.post(url, content=body, headers=headers)
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise _RetryableStatus(str(resp.status_code))
                # 4xx other than 429: the receiver refused it; retrying will not help.
