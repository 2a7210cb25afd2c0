"""Domain errors. Services raise these; ``app.main`` maps them to HTTP in one handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DomainError(Exception):
    """Base class: ``status`` is the HTTP status the web layer answers with."""

    status: int = 400

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message}
        if self.errors is not None:
            out["errors"] = self.errors
        return out


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    status = 409


class InvalidInput(DomainError):
    status = 422


class Unauthenticated(DomainError):
    status = 401


class Forbidden(DomainError):
    status = 403


class TooManyRequests(DomainError):
    status = 429

    def __init__(self, message: str, *, retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLarge(DomainError):
    status = 413


class UnsupportedMediaType(DomainError):
    status = 415


class ServiceUnavailable(DomainError):
    status = 503


class BackupFailed(DomainError):
    """``prefero db backup`` / ``restore`` could not complete (nothing was overwritten)."""

    status = 500


@dataclass(frozen=True, slots=True)
class RecordError:
    """One problem in an imported file: 1-based ``line``, the ``field`` path, a message."""

    line: int
    field: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message}


class ImportRejected(InvalidInput):
    """The whole import was rejected and nothing was written."""

    def __init__(self, errors: list[RecordError], *, total: int) -> None:
        more = f" (first {len(errors)} shown)" if total > len(errors) else ""
        super().__init__(
            f"import rejected: {total} error{'s' if total != 1 else ''}{more}; nothing was written",
            errors=[e.as_dict() for e in errors],
        )
        self.total = total
