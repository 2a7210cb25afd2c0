"""Members of members-only projects."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import insert_skipping_duplicates
from app.errors import InvalidInput
from app.models import ProjectMember, User
from app.services import audit
from app.services.projects import get_project
from app.services.transactions import write_transaction


def _users(session: Session, usernames: list[str]) -> dict[str, int]:
    wanted = list(dict.fromkeys(usernames))
    found = dict(
        session.execute(select(User.username, User.id).where(User.username.in_(wanted))).all()
    )
    unknown = [u for u in wanted if u not in found]
    if unknown:
        session.rollback()
        raise InvalidInput(
            f"unknown users: {', '.join(map(repr, unknown[:20]))}; nothing was changed",
            errors=[{"field": "usernames", "message": f"no user {u!r}"} for u in unknown[:100]],
        )
    return found


def list_members(
    session: Session, *, slug: str, limit: int | None = None, offset: int = 0
) -> list[str]:
    project = get_project(session, slug=slug)
    return list(
        session.scalars(
            select(User.username)
            .join(ProjectMember, ProjectMember.user_id == User.id)
            .where(ProjectMember.project_id == project.id)
            .order_by(User.username)
            .limit(limit)
            .offset(offset)
        )
    )


def add_members(
    session: Session, *, slug: str, usernames: list[str], actor: User | None = None
) -> list[str]:
    """Add users (already-members are left alone); returns the member list."""
    write_transaction(session)
    project = get_project(session, slug=slug)
    ids = _users(session, usernames)
    session.execute(
        insert_skipping_duplicates(session, ProjectMember.__table__, "project_id", "user_id"),
        [{"project_id": project.id, "user_id": uid} for uid in ids.values()],
    )
    audit.record_project(
        session, actor=actor, action="member.add", project=project, usernames=list(ids)
    )
    session.commit()
    return list_members(session, slug=slug)


def remove_members(
    session: Session, *, slug: str, usernames: list[str], actor: User | None = None
) -> list[str]:
    write_transaction(session)
    project = get_project(session, slug=slug)
    ids = _users(session, usernames)
    session.execute(
        delete(ProjectMember).where(
            ProjectMember.project_id == project.id, ProjectMember.user_id.in_(list(ids.values()))
        )
    )
    audit.record_project(
        session, actor=actor, action="member.remove", project=project, usernames=list(ids)
    )
    session.commit()
    return list_members(session, slug=slug)
