"""/api/v1/projects: create, list, read, update (admin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import AdminUser, PageLimit, PageOffset, SessionDep
from app.routes._responses import AUTHENTICATED, errors
from app.schemas import ProjectCreate, ProjectDetail, ProjectRead, ProjectUpdate
from app.services import projects

router = APIRouter(prefix="/api/v1", tags=["projects"], responses=AUTHENTICATED)


@router.post(
    "/projects",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectRead,
    responses=errors(400, 409, 413, 422),
)
def create_project(data: ProjectCreate, session: SessionDep, admin: AdminUser) -> ProjectRead:
    return projects.create_project(session, data=data, actor=admin)


@router.get("/projects", response_model=list[ProjectRead], responses=errors(422))
def list_projects(
    session: SessionDep, _: AdminUser, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[ProjectRead]:
    return projects.list_projects(session, limit=limit, offset=offset)


@router.get("/projects/{slug}", response_model=ProjectDetail, responses=errors(404, 422))
def get_project(slug: str, session: SessionDep, _: AdminUser) -> ProjectDetail:
    return projects.project_detail(session, slug=slug)


@router.patch(
    "/projects/{slug}", response_model=ProjectDetail, responses=errors(400, 404, 409, 413, 422)
)
def update_project(
    slug: str, data: ProjectUpdate, session: SessionDep, admin: AdminUser
) -> ProjectDetail:
    return projects.update_project(session, slug=slug, data=data, actor=admin)
