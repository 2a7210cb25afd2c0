"""The error answers a route can give, declared in its OpenAPI ``responses`` (``errors(404)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Response
from pydantic import BaseModel

from app.schemas import ErrorBody

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "The body could not be parsed (e.g. not UTF-8)."},
    401: {
        "description": "No, unknown or revoked token, or a deactivated account.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {"description": "Not allowed to this caller (e.g. the admin role is required)."},
    404: {"description": "The object named in the path does not exist."},
    409: {"description": "Conflicts with the current state; nothing was written."},
    413: {"description": "Body too large."},
    415: {"description": "Unsupported Content-Type."},
    422: {"description": "Invalid request; `errors` lists the problems."},
    429: {"description": "Too many requests.", "headers": _RETRY_AFTER},
    503: {"description": "Database unavailable; retry.", "headers": _RETRY_AFTER},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the :class:`ErrorBody` body."""
    return {code: {"model": ErrorBody, **_ERRORS[code]} for code in codes}


AUTHENTICATED = errors(401, 403, 503)
"""Every /api/v1 route: the caller is checked and the database is used."""


class JSONBody(Response):
    """A pydantic model as a JSON answer, serialised by pydantic itself (as FastAPI would
    serialise it for ``response_model``), without FastAPI's re-validation of the value."""

    media_type = "application/json"

    def __init__(
        self,
        model: BaseModel,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model.model_dump_json(), status_code=status_code, headers=headers)
