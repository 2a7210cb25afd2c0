"""``GET /metrics``: Prometheus text format (admin token; point the scraper's
``authorization`` at an admin API token)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import AdminUser, SessionDep
from app.observability import exposition
from app.services.monitoring import database_gauges

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep, _: AdminUser) -> Response:
    """Request counts, latency and in-flight requests of every worker process, with the
    queue depth, live leases and generation jobs read from the database now."""
    body, content_type = exposition(database_gauges(session))
    return Response(body, media_type=content_type)
