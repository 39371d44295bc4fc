"""kopf handlers for ``ImTenant``: create, update, resume, a drift timer, delete.

Registered on a registry passed in by :func:`imhub.operator.main.run`, never
on kopf's global one, so importing this module has no side effects and tests
can build an operator of their own.

Create, update and resume run the same idempotent pass. A pass that leaves a
component unready writes the status (condition ``False`` with a reason) and
raises :class:`kopf.TemporaryError`, so kopf retries with a growing delay;
the drift timer runs the pass on every object at a fixed interval and repairs
whatever was changed or deleted behind the operator's back.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from imhub.operator import config as config_mod
from imhub.operator import reconcile, spec

__all__ = ["register"]

logger = logging.getLogger(__name__)

_MAX_DELAY = 300.0


def _raw(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _poster(body: kopf.Body) -> reconcile.EventFn:
    def post(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])

    return post


def backoff(retry: int, base: float) -> float:
    """10 s, 20 s, 40 s, ... capped at five minutes (with the default base)."""
    return float(min(base * (2 ** min(retry, 10)), _MAX_DELAY))


def register(
    registry: kopf.OperatorRegistry,
    reconciler: reconcile.Reconciler,
    config: config_mod.OperatorConfig,
) -> None:
    resource = (spec.GROUP, spec.VERSION, spec.PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = config.finalizer
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="kopf.imhub.io"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kopf.imhub.io", key="last-handled-configuration"
        )
        # Our own events are posted explicitly; kopf's per-handler chatter
        # only when something is wrong.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 60
        settings.watching.client_timeout = 90
        settings.networking.request_timeout = 60

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A private registry gets none of kopf's default login handlers:
        # in-cluster service account first, then KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def close_clients(**_: Any) -> None:
        await reconciler.kube.close()

    async def run_pass(body: kopf.Body, retry: int) -> None:
        result = await reconciler.reconcile(_raw(body), _poster(body))
        if not result.ready:
            failed = ", ".join(f"{o.type} ({o.reason})" for o in result.failed)
            raise kopf.TemporaryError(
                f"not ready: {failed}", delay=backoff(retry, config.retry_delay)
            )

    @kopf.on.create(*resource, registry=registry, id="provision")
    async def on_create(body: kopf.Body, retry: int, **_: Any) -> None:
        await run_pass(body, retry)

    @kopf.on.update(*resource, registry=registry, id="update")
    async def on_update(body: kopf.Body, retry: int, **_: Any) -> None:
        await run_pass(body, retry)

    @kopf.on.resume(*resource, registry=registry, id="resume")
    async def on_resume(body: kopf.Body, retry: int, **_: Any) -> None:
        await run_pass(body, retry)

    @kopf.timer(
        *resource,
        registry=registry,
        id="drift",
        interval=config.drift_interval,
        initial_delay=config.drift_initial_delay,
    )
    async def drift(body: kopf.Body, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        # Failures are in the status; the next tick is the retry.
        await reconciler.reconcile(_raw(body), _poster(body))

    @kopf.on.delete(*resource, registry=registry, id="cleanup")
    async def on_delete(body: kopf.Body, retry: int, **_: Any) -> None:
        raw = _raw(body)
        post = _poster(body)
        report = await reconciler.cleanup(raw, post)
        if report.errors and retry + 1 < config.delete_attempts:
            await reconciler.write_status(raw, {"phase": "Deleting"})
            raise kopf.TemporaryError(
                f"cleanup incomplete ({'; '.join(report.errors)})",
                delay=backoff(retry, config.retry_delay),
            )
        policy = (raw.get("spec") or {}).get("deletionPolicy", "Retain")
        if report.errors:
            # Never leave the object stuck: give up on what is unreachable and
            # say what was left behind.
            post(
                "Warning",
                "CleanupIncomplete",
                f"finalizer removed after {retry + 1} attempts; NOT done: "
                + "; ".join(report.errors),
            )
            logger.warning(
                "ImTenant %s/%s deleted with leftovers: %s",
                raw["metadata"]["namespace"],
                raw["metadata"]["name"],
                report.errors,
            )
        else:
            post("Normal", "CleanedUp", f"deletionPolicy {policy}: " + ", ".join(report.done))
        reconciler.forget(raw["metadata"]["uid"])
