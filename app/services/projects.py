"""Projects: create, read, list, update, with their prompt/completion/annotation counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Annotation, Completion, Project, ProjectMember, Prompt, User
from app.schemas import ProjectCreate, ProjectDetail, ProjectRead, ProjectUpdate
from app.services import audit
from app.services.transactions import write_transaction

LONG_TEXTS = frozenset({"guidelines", "system_prompt", "instruction_template"})
"""Settings the audit log records by length only."""


def get_project(session: Session, *, slug: str) -> Project:
    project = session.scalar(select(Project).where(Project.slug == slug))
    if project is None:
        raise NotFound(f"project {slug!r} not found")
    return project


def create_project(session: Session, *, data: ProjectCreate, actor: User | None = None) -> Project:
    """Create a project; ``actor`` (None: the command line) is recorded in the audit log."""
    write_transaction(session)
    if session.scalar(select(Project.id).where(Project.slug == data.slug)) is not None:
        session.rollback()
        raise Conflict(f"a project with slug {data.slug!r} already exists")
    values = data.model_dump()
    project = Project(**values)
    session.add(project)
    try:
        session.flush()
        audit.record_project(
            session,
            actor=actor,
            action="project.create",
            project=project,
            **{
                k: {"chars": len(v)} if k in LONG_TEXTS else v
                for k, v in values.items()
                if k != "slug"
            },
        )
        session.commit()
    except IntegrityError:  # lost a race with a concurrent create
        session.rollback()
        raise Conflict(f"a project with slug {data.slug!r} already exists") from None
    return project


def list_projects(session: Session, *, limit: int | None = None, offset: int = 0) -> list[Project]:
    """Projects by id; ``limit``/``offset`` page through them (None: all)."""
    return list(session.scalars(select(Project).order_by(Project.id).limit(limit).offset(offset)))


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


def update_project(
    session: Session, *, slug: str, data: ProjectUpdate, actor: User | None = None
) -> ProjectDetail:
    """Change the given settings (omitted or null fields are left alone); the audit log
    records each changed setting's old and new value (long texts by length)."""
    write_transaction(session)
    try:
        project = get_project(session, slug=slug)
    except NotFound:
        session.rollback()
        raise
    changes: dict[str, Any] = {}
    for name, value in data.model_dump(exclude_unset=True).items():
        old = getattr(project, name)
        if value is not None and value != old:
            changes[name] = (
                audit.text_change(old, value) if name in LONG_TEXTS else {"from": old, "to": value}
            )
            setattr(project, name, value)
    audit.record_project(
        session, actor=actor, action="project.update", project=project, changes=changes
    )
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
