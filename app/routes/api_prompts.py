"""/api/v1 prompt import and browsing (admin)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.deps import AdminUser, SessionDep, SettingsDep
from app.errors import InvalidInput, UnsupportedMediaType
from app.routes._responses import AUTHENTICATED, errors
from app.routes._uploads import declared_too_large, limited, too_large
from app.schemas import MAX_ID, ImportResult, PromptDetail, PromptPage
from app.services import imports, projects, prompts

router = APIRouter(prefix="/api/v1", tags=["prompts"], responses=AUTHENTICATED)

RAW_TYPES = {
    "",
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json",
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
    "text/plain",
}
_SPOOL_IN_MEMORY = 8 * 1024 * 1024

_record_example = {
    "id": "p-1",
    "prompt": "Write a haiku about spring.",
    "completions": [{"id": "a", "text": "Cherry petals fall…", "model": "m1"}],
    "metadata": {"source": "demo"},
}
IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON Lines, a JSON array of records, or HH-RLHF {chosen, rejected} "
        "records; gzip allowed. Multipart uploads send the file in the field `file`.",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}},
                "example": [_record_example],
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}


async def _spool(chunks: AsyncIterator[bytes]) -> Any:
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    async for chunk in chunks:
        spool.write(chunk)
    spool.seek(0)
    return spool


@router.post(
    "/projects/{slug}/prompts",
    status_code=status.HTTP_201_CREATED,
    response_model=ImportResult,
    openapi_extra=IMPORT_BODY,
    responses=errors(400, 404, 409, 413, 415, 422),
)
async def import_prompts(
    slug: str, request: Request, session: SessionDep, settings: SettingsDep, admin: AdminUser
) -> ImportResult:
    limit = settings.max_import_bytes
    if declared_too_large(request, limit):
        raise too_large(limit)
    # Answer 404 before reading a large body for a project that does not exist.
    await run_in_threadpool(projects.get_project, session, slug=slug)
    body = limited(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await body.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("multipart upload needs the file in a field named 'file'")
        source = upload.file
    elif ctype in RAW_TYPES:
        source = await _spool(body.stream())
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {ctype!r}: send application/x-ndjson, "
            "application/json or multipart/form-data"
        )
    try:
        return await run_in_threadpool(
            imports.import_prompts,
            session,
            project_slug=slug,
            source=source,
            max_bytes=limit,
            actor=admin,
        )
    finally:
        source.close()


@router.get("/projects/{slug}/prompts", response_model=PromptPage, responses=errors(404, 422))
def list_prompts(
    slug: str,
    session: SessionDep,
    _: AdminUser,
    after: Annotated[str | None, Query(max_length=32, description="Cursor from `next`.")] = None,
    limit: Annotated[int, Query(ge=1, le=prompts.MAX_PAGE)] = 100,
) -> PromptPage:
    return prompts.list_prompts(session, project_slug=slug, after=after, limit=limit)


@router.get("/prompts/{prompt_id}", response_model=PromptDetail, responses=errors(404, 422))
def get_prompt(
    prompt_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _: AdminUser
) -> PromptDetail:
    return prompts.get_prompt_detail(session, prompt_id=prompt_id)
