"""/api/v1 generation jobs (admin): queue, follow, cancel. Jobs run in ``prefero worker``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from app.deps import AdminUser, PageLimit, PageOffset, SessionDep
from app.routes._responses import AUTHENTICATED, errors
from app.schemas import MAX_ID, JobCreate, JobRead
from app.services import generation

router = APIRouter(prefix="/api/v1", tags=["generation"], responses=AUTHENTICATED)

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post(
    "/projects/{slug}/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=errors(400, 404, 409, 413, 422),
)
def create_job(slug: str, data: JobCreate, session: SessionDep, user: AdminUser) -> JobRead:
    """Queue generation of K completions per prompt; a `prefero worker` runs it."""
    return generation.create_job(session, project_slug=slug, data=data, actor=user)


@router.get("/projects/{slug}/jobs", response_model=list[JobRead], responses=errors(404, 422))
def list_jobs(
    slug: str, session: SessionDep, _: AdminUser, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[JobRead]:
    """The project's jobs, newest first."""
    return generation.list_jobs(session, project_slug=slug, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobRead, responses=errors(404, 422))
def get_job(job_id: JobId, session: SessionDep, _: AdminUser) -> JobRead:
    return generation.get_job(session, job_id=job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobRead, responses=errors(404, 409, 422))
def cancel_job(job_id: JobId, session: SessionDep, admin: AdminUser) -> JobRead:
    return generation.cancel_job(session, job_id=job_id, actor=admin)
