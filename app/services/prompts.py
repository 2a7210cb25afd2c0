"""Reading prompts: keyset-paginated listing and one prompt with its completions and labels."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.errors import InvalidInput, NotFound
from app.models import Annotation, AnnotationStatus, Completion, Prompt, User
from app.schemas import (
    MAX_ID,
    AnnotationRead,
    CompletionRead,
    ProjectDetail,
    ProjectRead,
    PromptDetail,
    PromptPage,
    PromptRead,
)
from app.services.projects import get_project, project_detail

MAX_PAGE = 500


def list_prompts(
    session: Session, *, project_slug: str, after: str | None, limit: int
) -> PromptPage:
    """Prompts in id order, ``limit`` at a time; ``after`` is the previous page's ``next``."""
    cursor = _cursor(after, limit)
    project = get_project(session, slug=project_slug)
    rows, next_cursor = _page(session, project.id, cursor, limit)
    return PromptPage(items=[PromptRead.model_validate(p) for p in rows], next=next_cursor)


def _cursor(after: str | None, limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    if not after:
        return 0
    if not (after.isascii() and after.isdigit()) or int(after) > MAX_ID:
        raise InvalidInput("after: not a cursor returned by this endpoint")
    return int(after)


def _page(
    session: Session, project_id: int, cursor: int, limit: int
) -> tuple[list[Prompt], str | None]:
    rows = list(
        session.scalars(
            select(Prompt)
            .where(Prompt.project_id == project_id, Prompt.id > cursor)
            .order_by(Prompt.id)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (str(rows[-1].id) if more else None)


def get_prompt_detail(session: Session, *, prompt_id: int) -> PromptDetail:
    prompt = session.scalar(
        select(Prompt).where(Prompt.id == prompt_id).options(selectinload(Prompt.completions))
    )
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} not found")
    annotations = session.scalars(
        select(Annotation).where(Annotation.prompt_id == prompt_id).order_by(Annotation.id)
    )
    return PromptDetail(
        **PromptRead.model_validate(prompt).model_dump(),
        completions=prompt.completions,
        annotations=[AnnotationRead.model_validate(a) for a in annotations],
    )


# --------------------------------------------------------------------------- admin pages


@dataclass(frozen=True, slots=True)
class PromptSummary:
    """One row of the prompt browser."""

    id: int
    external_id: str
    text: str
    """The last user message (the prompt itself), else the last message."""
    turns: int
    completion_count: int
    annotation_count: int
    """Submitted annotations (first revisions), as the task queue counts them."""
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PromptBrowser:
    project: ProjectDetail
    items: list[PromptSummary]
    next: str | None
    first: bool
    """True on the first page (no ``after`` cursor)."""


def browse_prompts(
    session: Session, *, project_slug: str, after: str | None, limit: int
) -> PromptBrowser:
    """A page of the project's prompts for the admin pages: as :func:`list_prompts`, with
    the project's counts and each prompt's completion and annotation counts."""
    cursor = _cursor(after, limit)
    project = project_detail(session, slug=project_slug)
    rows, next_cursor = _page(session, project.id, cursor, limit)
    ids = [p.id for p in rows]
    completions = (
        dict(
            session.execute(
                select(Completion.prompt_id, func.count())
                .where(Completion.prompt_id.in_(ids))
                .group_by(Completion.prompt_id)
            ).all()
        )
        if ids
        else {}
    )
    items = [
        PromptSummary(
            id=p.id,
            external_id=p.external_id,
            text=_prompt_text(p.messages),
            turns=len(p.messages),
            completion_count=completions.get(p.id, 0),
            annotation_count=p.annotation_count,
            created_at=p.created_at,
        )
        for p in rows
    ]
    return PromptBrowser(project=project, items=items, next=next_cursor, first=cursor == 0)


def _prompt_text(messages: list[Any]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    last = (users or messages or [{}])[-1]
    return str(last.get("content", "")) if isinstance(last, dict) else ""


def completion_label(index: int) -> str:
    """A, B, … Z, then 27, 28 …: how the prompt page names completions (in id order)."""
    return chr(ord("A") + index) if index < 26 else str(index + 1)


@dataclass(frozen=True, slots=True)
class CompletionView:
    label: str
    completion: CompletionRead


@dataclass(frozen=True, slots=True)
class AnnotationView:
    annotation: AnnotationRead
    username: str
    ranking: list[list[str]]
    """The ranking with the completions' labels, best first; ties share an inner list."""
    shown: list[str]
    """The labels in the order the annotator saw the completions."""
    likert: list[tuple[str, int]]
    flags: list[tuple[str, list[str]]]
    superseded: bool
    """A later revision by the same annotator replaced this one."""

    @property
    def skipped(self) -> bool:
        return self.annotation.status == AnnotationStatus.skipped


@dataclass(frozen=True, slots=True)
class PromptView:
    project: ProjectRead
    prompt: PromptRead
    completions: list[CompletionView]
    annotations: list[AnnotationView]


def prompt_view(session: Session, *, project_slug: str, prompt_id: int) -> PromptView:
    """One prompt of the project with its completions (labelled A, B, … in id order) and every
    annotation of it (oldest first, superseded revisions included and marked)."""
    project = get_project(session, slug=project_slug)
    prompt = session.scalar(
        select(Prompt)
        .where(Prompt.id == prompt_id, Prompt.project_id == project.id)
        .options(selectinload(Prompt.completions))
    )
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} not found in project {project_slug!r}")
    completions = [
        CompletionView(completion_label(i), CompletionRead.model_validate(c))
        for i, c in enumerate(prompt.completions)
    ]
    labels = {c.completion.id: c.label for c in completions}

    def label(completion_id: Any) -> str:
        try:
            return labels.get(int(completion_id)) or f"#{completion_id}"
        except (TypeError, ValueError):
            return f"#{completion_id}"

    def order(key: str) -> int:
        try:
            return list(labels).index(int(key))
        except ValueError:
            return len(labels)

    rows = session.execute(
        select(Annotation, User.username)
        .join(User, Annotation.user_id == User.id)
        .where(Annotation.prompt_id == prompt.id)
        .order_by(Annotation.id)
    ).all()
    latest: dict[int, int] = {}
    for a, _ in rows:
        latest[a.user_id] = max(latest.get(a.user_id, 0), a.revision)
    annotations = [
        AnnotationView(
            annotation=AnnotationRead.model_validate(a),
            username=username,
            ranking=[[label(c) for c in group] for group in a.ranking or []],
            shown=[label(c) for c in a.display_order or []],
            likert=[(label(k), v) for k, v in sorted((a.likert or {}).items(), key=_by(order))],
            flags=[
                (label(k), list(v)) for k, v in sorted((a.flags or {}).items(), key=_by(order)) if v
            ],
            superseded=a.revision < latest[a.user_id],
        )
        for a, username in rows
    ]
    return PromptView(
        project=ProjectRead.model_validate(project),
        prompt=PromptRead.model_validate(prompt),
        completions=completions,
        annotations=annotations,
    )


def _by(order: Any) -> Any:
    return lambda item: order(item[0])
