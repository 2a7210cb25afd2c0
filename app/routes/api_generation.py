"""/api/v1 generation jobs (admin): queue, follow, cancel. Jobs run in ``prefero worker``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from app.deps import AdminUser, SessionDep
from app.schemas import MAX_ID, JobCreate, JobRead
from app.services import generation

router = APIRouter(prefix="/api/v1", tags=["generation"])

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post(
    "/projects/{slug}/generate", status_code=status.HTTP_202_ACCEPTED, response_model=JobRead
)
def create_job(slug: str, data: JobCreate, session: SessionDep, user: AdminUser) -> JobRead:
    """Queue generation of K completions per prompt; a `prefero worker` runs it."""
    return generation.create_job(session, project_slug=slug, data=data, user_id=user.id)


@router.get("/projects/{slug}/jobs", response_model=list[JobRead])
def list_jobs(slug: str, session: SessionDep, _: AdminUser) -> list[JobRead]:
    return generation.list_jobs(session, project_slug=slug)


@router.get("/jobs/{job_id}", response_model=JobRead)
def get_job(job_id: JobId, session: SessionDep, _: AdminUser) -> JobRead:
    return generation.get_job(session, job_id=job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: JobId, session: SessionDep, _: AdminUser) -> JobRead:
    return generation.cancel_job(session, job_id=job_id)
