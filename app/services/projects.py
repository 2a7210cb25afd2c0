"""Projects: create, read, list, update, with their prompt/completion/annotation counts."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Annotation, Completion, Project, ProjectMember, Prompt, User
from app.schemas import ProjectCreate, ProjectDetail, ProjectRead, ProjectUpdate
from app.services.transactions import write_transaction


def get_project(session: Session, *, slug: str) -> Project:
    project = session.scalar(select(Project).where(Project.slug == slug))
    if project is None:
        raise NotFound(f"project {slug!r} not found")
    return project


def create_project(session: Session, *, data: ProjectCreate) -> Project:
    write_transaction(session)
    if session.scalar(select(Project.id).where(Project.slug == data.slug)) is not None:
        session.rollback()
        raise Conflict(f"a project with slug {data.slug!r} already exists")
    project = Project(**data.model_dump())
    session.add(project)
    try:
        session.commit()
    except IntegrityError:  # lost a race with a concurrent create
        session.rollback()
        raise Conflict(f"a project with slug {data.slug!r} already exists") from None
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def list_project_details(session: Session) -> list[ProjectDetail]:
    """Every project with its counts (as :func:`project_detail`), oldest first: four queries
    however many projects there are."""
    projects = list_projects(session)
    prompts = dict(
        session.execute(select(Prompt.project_id, func.count()).group_by(Prompt.project_id)).all()
    )
    completions = dict(
        session.execute(
            select(Prompt.project_id, func.count(Completion.id))
            .join(Completion, Completion.prompt_id == Prompt.id)
            .group_by(Prompt.project_id)
        ).all()
    )
    annotations = dict(
        session.execute(
            select(Annotation.project_id, func.count()).group_by(Annotation.project_id)
        ).all()
    )
    return [
        ProjectDetail(
            **ProjectRead.model_validate(project).model_dump(),
            prompt_count=prompts.get(project.id, 0),
            completion_count=completions.get(project.id, 0),
            annotation_count=annotations.get(project.id, 0),
        )
        for project in projects
    ]


def update_project(session: Session, *, slug: str, data: ProjectUpdate) -> ProjectDetail:
    """Change the given settings (omitted or null fields are left alone)."""
    write_transaction(session)
    project = get_project(session, slug=slug)
    for name, value in data.model_dump(exclude_unset=True).items():
        if value is not None:
            setattr(project, name, value)
    session.commit()
    return project_detail(session, slug=slug)


def project_detail(session: Session, *, slug: str) -> ProjectDetail:
    project = get_project(session, slug=slug)
    prompts = session.scalar(select(func.count()).where(Prompt.project_id == project.id))
    completions = session.scalar(
        select(func.count())
        .select_from(Completion)
        .join(Prompt, Completion.prompt_id == Prompt.id)
        .where(Prompt.project_id == project.id)
    )
    annotations = session.scalar(select(func.count()).where(Annotation.project_id == project.id))
    return ProjectDetail(
        **ProjectRead.model_validate(project).model_dump(),
        prompt_count=prompts or 0,
        completion_count=completions or 0,
        annotation_count=annotations or 0,
    )


@dataclass(frozen=True, slots=True)
class ProjectPage:
    """What the admin page of a project shows: its settings and counts, and its members."""

    project: ProjectDetail
    members: list[str]


def project_page(session: Session, *, slug: str) -> ProjectPage:
    detail = project_detail(session, slug=slug)
    members = session.scalars(
        select(User.username)
        .join(ProjectMember, ProjectMember.user_id == User.id)
        .where(ProjectMember.project_id == detail.id)
        .order_by(User.username)
    )
    return ProjectPage(project=detail, members=list(members))
