"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from app.schemas import Health
from app.services.health import readiness

router = APIRouter(tags=["health"])


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """The annotator's home page (which sends anonymous visitors on to /login)."""
    return RedirectResponse("/label")


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> JSONResponse:
    """The database is reachable and its schema is at the latest migration."""
    ready, detail, rev = await run_in_threadpool(readiness, request.app.state.engine)
    body = Health(
        status="ok" if ready else "unavailable",
        detail=detail,
        database=request.app.state.engine.dialect.name,
        migration=rev,
    )
    if ready:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "2"})
