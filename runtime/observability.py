"""Structured logs and Prometheus metrics.

Log lines are JSON with ``tenant_id``, ``conv_id`` and ``request_id`` taken
from context variables, so a handler sets them once and every line below it
carries them. Message bodies, tokens and secrets are never logged.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram
from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "ACKS",
    "CONNECTIONS",
    "DELIVERIES",
    "ERRORS",
    "MESSAGES",
    "SEND_ACK_SECONDS",
    "SEND_DELIVER_SECONDS",
    "configure_logging",
    "log_context",
]

_tenant_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant_id", default=None)
_conv_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("conv_id", default=None)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_conn_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("conn_id", default=None)
_VARS = {
    "tenant_id": _tenant_id,
    "conv_id": _conv_id,
    "request_id": _request_id,
    "conn_id": _conn_id,
}


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if not hasattr(record, name):
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Set ``tenant_id``/``conv_id``/``request_id``/``conn_id`` for log lines inside."""
    tokens = [(_VARS[k], _VARS[k].set(v)) for k, v in values.items() if k in _VARS]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind(**values: str | None) -> None:
    """Set context values for the rest of the current task."""
    for key, value in values.items():
        _VARS[key].set(value)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print query strings (signed URLs): keep it quiet.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# -- metrics --------------------------------------------------------------------

CONNECTIONS = Gauge("imhub_ws_connections", "Open, authorized WebSocket connections", ["tenant"])
MESSAGES = Counter("imhub_messages_total", "Messages stored", ["tenant"])
DELIVERIES = Counter("imhub_deliveries_total", "Frames pushed to connections", ["event"])
ACKS = Counter("imhub_acks_total", "Acks sent", ["event", "result"])
ERRORS = Counter("imhub_errors_total", "Errors returned to clients", ["code"])
SEND_ACK_SECONDS = Histogram(
    "imhub_send_ack_seconds",
    "From receiving send_message to sending its ack",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SEND_DELIVER_SECONDS = Histogram(
    "imhub_send_deliver_seconds",
    "From receiving send_message at a gateway to pushing message_created at a gateway",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_BATCH = Histogram(
    "imhub_consumer_batch_size",
    "Records per consumer batch",
    ["service"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
