"""Request bodies with a size limit, shared by the import API and the admin import form."""

from __future__ import annotations

from fastapi import Request
from starlette.types import Message

from app.errors import PayloadTooLarge
from app.observability import set_body_limit


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes")


def declared_too_large(request: Request, limit: int) -> bool:
    """The request announces (``Content-Length``) a body larger than ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > limit


def limited(request: Request, limit: int) -> Request:
    """The same request, whose body raises :class:`PayloadTooLarge` (413) once more than
    ``limit`` bytes arrived. Its body is read as it streams: a multipart upload is spooled to a
    temporary file by Starlette's parser, never held whole in memory."""
    received = 0
    # Above the app-wide PREFERO_MAX_REQUEST_BYTES, with the same message as ours.
    set_body_limit(request.scope, limit, what="upload")

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)
        return message

    return Request(request.scope, receive)
