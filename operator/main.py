"""Entry point of ``imhub operator``: configuration, wiring, and kopf's loop.

:func:`run` is called by :mod:`imhub.cli` with the parsed arguments
(``--namespace`` repeatable; none means cluster-wide). The operator always
runs standalone (no kopf peering objects): one replica, restarted by its
Deployment; two replicas would reconcile the same objects twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import kopf
from pydantic import ValidationError

from imhub.operator import config as config_mod
from imhub.operator import handlers, kube, reconcile

__all__ = ["build_operator", "run"]

logger = logging.getLogger(__name__)


def build_operator(
    config: config_mod.OperatorConfig,
    *,
    kube_client: kube.Kube | None = None,
    backends: reconcile.Backends | None = None,
) -> tuple[kopf.OperatorRegistry, reconcile.Reconciler]:
    """A registry with the ImTenant handlers, and the reconciler behind them."""
    registry = kopf.OperatorRegistry()
    reconciler = reconcile.Reconciler(
        config,
        kube_client if kube_client is not None else kube.Kube(),
        backends if backends is not None else reconcile.Backends.from_config(config),
    )
    handlers.register(registry, reconciler, config)
    return registry, reconciler


class _QuietTimer(logging.Filter):
    """Drop kopf's "Timer 'drift' succeeded." line: one per tenant per interval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'drift' succeeded")


def _fail(message: str) -> int:
    print(f"imhub operator: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace | Any) -> int:
    """Run the operator until SIGINT/SIGTERM; 2 on a configuration error."""
    try:
        config = config_mod.OperatorConfig()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _fail(f"bad setting IMHUB_OPERATOR_{where.upper()}: {first['msg']}")

    from kubernetes import config as kube_config

    try:
        registry, _ = build_operator(config)
    except (kube_config.ConfigException, OSError) as exc:
        return _fail(f"no Kubernetes credentials (in-cluster or KUBECONFIG): {exc}")
    except ValueError as exc:
        return _fail(str(exc))

    namespaces = list(getattr(args, "namespace", None) or [])
    kopf.configure(
        debug=config.log_level == "DEBUG",
        quiet=config.log_level == "WARNING",
        log_format=kopf.LogFormat.JSON,
        log_refkey="k8s",
    )
    logging.getLogger("kopf.objects").addFilter(_QuietTimer())
    logger.info(
        "imhub operator starting",
        extra={"namespaces": namespaces or "*", "drift_interval": config.drift_interval},
    )
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=config.liveness_endpoint,
            )
        )
    except kopf.LoginError as exc:
        return _fail(f"cannot log in to the Kubernetes API: {exc}")
    return 0
