"""/api/v1 export of a project's annotations (admin): pairs, rankings, consensus, HH-RLHF."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.deps import AdminUser, SessionDep, SettingsDep
from app.routes._responses import AUTHENTICATED, errors
from app.schemas import ExportParams
from app.services import exports

router = APIRouter(prefix="/api/v1", tags=["export"], responses=AUTHENTICATED)

EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON Lines streamed as it is read (`file=jsonl`, the default), or a "
        "Parquet file (`file=parquet`). Rows and fields: docs/export.md.",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **errors(404, 422),
}


@router.get("/projects/{slug}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
async def export(
    slug: str,
    params: Annotated[ExportParams, Query()],
    session: SessionDep,
    settings: SettingsDep,
    admin: AdminUser,
) -> StreamingResponse:
    """Export the project's current annotations (superseded revisions and skips never appear)
    from one consistent snapshot, streamed with constant memory."""
    # The session stays open while the body streams: FastAPI closes request-scoped `yield`
    # dependencies only after the response has been sent.
    export = await run_in_threadpool(
        lambda: exports.open_export(
            session,
            project_slug=slug,
            params=params,
            secret=settings.get_secret_key(),
            actor=admin,
        )
    )
    return StreamingResponse(
        export.chunks(),
        media_type=export.media_type,
        headers={"Content-Disposition": f'attachment; filename="{export.filename}"'},
    )
