"""Errors a client or an operator can act on.

Every domain error has one root and a machine-readable code; the WebSocket and
REST layers render errors from the code, never from the message text::

    ImhubError                   code, http_status, message
    ├── Unauthorized             missing, invalid or expired credentials
    ├── Forbidden                authenticated, but not allowed
    ├── NotFound                 no such thing (or not visible to the caller)
    ├── InvalidPayload           malformed or semantically wrong input
    ├── TooLarge                 over a size limit
    ├── RateLimited              over a rate limit
    ├── Conflict                 clashes with existing state
    ├── Unavailable              a dependency or peer is not reachable right now
    └── Internal                 a bug; details are logged, never sent

Misuse of the code itself (a bug) raises ``RuntimeError``/``ValueError``/
``TypeError`` as usual; :class:`ImhubError` is for conditions at the edge.

For background workers (consumers, the operator) :class:`TemporaryError`
says "try again later" and :class:`PermanentError` says "retrying will not
help": the decision to retry or to give up is made by type.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "Conflict",
    "ErrorCode",
    "Forbidden",
    "ImhubError",
    "Internal",
    "InvalidPayload",
    "NotFound",
    "PermanentError",
    "RateLimited",
    "TemporaryError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]


class ErrorCode(enum.StrEnum):
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID_PAYLOAD = "invalid_payload"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


_HTTP_STATUS = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_PAYLOAD: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ImhubError(Exception):
    """An error with a code the client can act on."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_dict(body: dict[str, Any]) -> ImhubError:
        """Rebuild an error that crossed the bus (the code picks the class)."""
        code = ErrorCode(body.get("code", ErrorCode.INTERNAL))
        cls = _BY_CODE.get(code, Internal)
        return cls(str(body.get("message", code.value)), details=body.get("details"))


class Unauthorized(ImhubError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ImhubError):
    code = ErrorCode.FORBIDDEN


class NotFound(ImhubError):
    code = ErrorCode.NOT_FOUND


class InvalidPayload(ImhubError):
    code = ErrorCode.INVALID_PAYLOAD


class TooLarge(ImhubError):
    code = ErrorCode.TOO_LARGE


class RateLimited(ImhubError):
    code = ErrorCode.RATE_LIMITED


class Conflict(ImhubError):
    code = ErrorCode.CONFLICT


class Unavailable(ImhubError):
    code = ErrorCode.UNAVAILABLE


class Internal(ImhubError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[ImhubError]] = {
    cls.code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        NotFound,
        InvalidPayload,
        TooLarge,
        RateLimited,
        Conflict,
        Unavailable,
        Internal,
    )
}


class TemporaryError(Exception):
    """A background step failed for a reason that may pass; retry after ``delay``."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(Exception):
    """A background step failed for a reason retrying will not fix."""
