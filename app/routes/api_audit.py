"""/api/v1/audit: the admin audit log (admin), newest first, keyset-paginated."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.deps import AdminUser, SessionDep
from app.routes._responses import AUTHENTICATED, errors
from app.schemas import AuditPage
from app.services import audit

router = APIRouter(prefix="/api/v1", tags=["audit"], responses=AUTHENTICATED)


@router.get("/audit", response_model=AuditPage, responses=errors(422))
def list_audit_events(
    session: SessionDep,
    _: AdminUser,
    after: Annotated[str | None, Query(max_length=32, description="Cursor from `next`.")] = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_PAGE)] = 100,
    actor: Annotated[str | None, Query(max_length=64, description="A username, or 'cli'.")] = None,
    action: Annotated[
        str | None,
        Query(max_length=64, description="An action (user.create) or a category (user)."),
    ] = None,
    target_type: Literal["project", "user"] | None = None,
    target: Annotated[
        str | None, Query(max_length=200, description="A project's slug or a user's name.")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="Events at or after this time (ISO 8601; UTC if naive).")
    ] = None,
) -> AuditPage:
    """Who did what to which project or user, and when: every admin action, newest first."""
    return audit.list_events(
        session,
        after=after,
        limit=limit,
        actor=actor,
        action=action,
        target_type=target_type,
        target=target,
        since=since,
    )
