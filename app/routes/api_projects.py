"""/api/v1/projects: create, list, read, update (admin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import AdminUser, SessionDep
from app.schemas import ProjectCreate, ProjectDetail, ProjectRead, ProjectUpdate
from app.services import projects

router = APIRouter(prefix="/api/v1", tags=["projects"])


@router.post("/projects", status_code=status.HTTP_201_CREATED, response_model=ProjectRead)
def create_project(data: ProjectCreate, session: SessionDep, _: AdminUser) -> ProjectRead:
    return projects.create_project(session, data=data)


@router.get("/projects", response_model=list[ProjectRead])
def list_projects(session: SessionDep, _: AdminUser) -> list[ProjectRead]:
    return projects.list_projects(session)


@router.get("/projects/{slug}", response_model=ProjectDetail)
def get_project(slug: str, session: SessionDep, _: AdminUser) -> ProjectDetail:
    return projects.project_detail(session, slug=slug)


@router.patch("/projects/{slug}", response_model=ProjectDetail)
def update_project(
    slug: str, data: ProjectUpdate, session: SessionDep, _: AdminUser
) -> ProjectDetail:
    return projects.update_project(session, slug=slug, data=data)
