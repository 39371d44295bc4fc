"""The consume-process-commit loop shared by the message and RTC services.

A batch is committed only after its handler returned, i.e. after its effects
are durable and its events produced. A :class:`TemporaryError` leaves the
batch uncommitted and retries it after a backoff; the handler must therefore
be idempotent, which both services are (dedupe by client_msg_id, and signals
are fire-and-forget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from imhub.runtime import errors, observability, ports

__all__ = ["run_consumer"]

logger = logging.getLogger(__name__)

Handler = Callable[[Sequence[ports.Record]], Awaitable[None]]


async def run_consumer(
    consumer: ports.Consumer,
    handler: Handler,
    *,
    name: str,
    stop: asyncio.Event,
    batch: int = 500,
    linger: float = 0.002,
    max_backoff: float = 5.0,
) -> None:
    """Consume until ``stop``. A batch that arrives small waits ``linger`` seconds
    once for company: a handler's cost is mostly per batch (a transaction), so a
    couple of milliseconds here buys far more under load than it costs idle."""
    backoff = 0.05
    pending: list[ports.Record] = []
    try:
        while not stop.is_set():
            if not pending:
                pending = await consumer.poll(batch, 0.5)
                if not pending:
                    continue
                if len(pending) < batch and linger > 0:
                    await asyncio.sleep(linger)
                    pending += await consumer.poll(batch - len(pending), 0)
            observability.CONSUMER_BATCH.labels(name).observe(len(pending))
            try:
                await handler(pending)
            except Exception as exc:
                if not isinstance(exc, errors.TemporaryError | errors.Unavailable):
                    logger.exception("%s: unexpected error in a batch of %d", name, len(pending))
                # Keep the batch and retry it: nothing was committed.
                logger.warning(
                    "%s: batch of %d failed, retrying in %.2fs: %s",
                    name,
                    len(pending),
                    backoff,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            await consumer.commit(pending)
            pending = []
            backoff = 0.05
    finally:
        await consumer.close()
