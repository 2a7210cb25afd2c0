"""The admin audit log: who did what to which project or user, and when.

A service that changes what admins manage calls :func:`record` inside its own transaction,
before its commit, so that the action and its audit row are committed (or rolled back)
together; :func:`record` never commits. Rows are never updated or deleted. ``details`` holds
parameters and counts only: never tokens, passwords, nor prompt, completion or annotation text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.models import AuditEvent, Project, User
from app.schemas import MAX_ID, AuditEventRead, AuditPage

ACTIONS = (
    "project.create",
    "project.update",
    "project.export",
    "member.add",
    "member.remove",
    "prompts.import",
    "job.create",
    "job.cancel",
    "user.create",
    "user.activate",
    "user.deactivate",
    "token.create",
    "token.revoke",
)
"""Every action the log records (``docs/api.md`` says what each one's details hold)."""
CATEGORIES = tuple(dict.fromkeys(a.split(".")[0] for a in ACTIONS))
"""Action prefixes: filtering on ``project`` finds ``project.create``, ``project.update`` …"""
TARGET_TYPES = ("project", "user")
CLI_ACTOR = "cli"
"""The actor recorded for the command line (``prefero …``), which runs without a login."""
MAX_PAGE = 500
_SECRET_KEYS = frozenset({"password", "password_hash", "token", "token_hash", "secret"})

TargetType = Literal["project", "user"]


def record(
    session: Session,
    *,
    actor: User | None,
    action: str,
    target_type: TargetType,
    target_id: int | None,
    target_label: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit row to the caller's transaction (flushed and committed by the caller).

    ``actor`` is the acting user, or None for the command line (recorded as ``"cli"``)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if target_type not in TARGET_TYPES:
        raise ValueError(f"unknown audit target type {target_type!r}")
    details = details or {}
    if _SECRET_KEYS & details.keys():
        raise ValueError(f"audit details must not hold secrets: {sorted(details)}")
    event = AuditEvent(
        actor_id=actor.id if actor is not None else None,
        actor=actor.username if actor is not None else CLI_ACTOR,
        action=action,
        target_type=target_type,
        target_id=target_id,
        target_label=target_label,
        details=details,
    )
    session.add(event)
    return event


def record_project(
    session: Session, *, actor: User | None, action: str, project: Project, **details: Any
) -> AuditEvent:
    """:func:`record` of an action on ``project``."""
    return record(
        session,
        actor=actor,
        action=action,
        target_type="project",
        target_id=project.id,
        target_label=project.slug,
        details=details,
    )


def record_user(
    session: Session, *, actor: User | None, action: str, user: User, **details: Any
) -> AuditEvent:
    """:func:`record` of an action on ``user``."""
    return record(
        session,
        actor=actor,
        action=action,
        target_type="user",
        target_id=user.id,
        target_label=user.username,
        details=details,
    )


def text_change(old: str, new: str) -> dict[str, int]:
    """A long text's change as lengths (its content stays out of the log)."""
    return {"from_chars": len(old), "to_chars": len(new)}


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise InvalidInput("since: out of range once converted to UTC") from None


def list_events(
    session: Session,
    *,
    after: str | None = None,
    limit: int = 100,
    actor: str | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
) -> AuditPage:
    """Audit events newest first, ``limit`` at a time; ``after`` is the previous page's
    ``next``. ``action`` is an action or a category (``user`` finds every ``user.*``);
    ``target`` is a project's slug or a user's name; ``since`` is inclusive (UTC if naive)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    for name, value in (("actor", actor), ("target", target)):
        if value and "\x00" in value:
            raise InvalidInput(f"{name}: must not contain NUL characters")
    query = select(AuditEvent)
    if after:
        if not (after.isascii() and after.isdigit()) or int(after) > MAX_ID:
            raise InvalidInput("after: not a cursor returned by this endpoint")
        query = query.where(AuditEvent.id < int(after))
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        if action in ACTIONS:
            query = query.where(AuditEvent.action == action)
        elif action in CATEGORIES:
            query = query.where(AuditEvent.action.startswith(action + "."))
        else:
            raise InvalidInput(
                f"action: unknown action {action!r}",
                errors=[{"field": "action", "message": "one of " + ", ".join(ACTIONS)}],
            )
    if target_type:
        if target_type not in TARGET_TYPES:
            raise InvalidInput(f"target_type must be one of {', '.join(TARGET_TYPES)}")
        query = query.where(AuditEvent.target_type == target_type)
    if target:
        query = query.where(AuditEvent.target_label == target)
    if since is not None:
        query = query.where(AuditEvent.created_at >= _utc(since))
    rows = list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(
        items=[AuditEventRead.model_validate(r) for r in rows],
        next=str(rows[-1].id) if more else None,
    )
