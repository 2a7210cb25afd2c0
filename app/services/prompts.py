"""Reading prompts: keyset-paginated listing and one prompt with its completions and labels."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.errors import InvalidInput, NotFound
from app.models import Annotation, Prompt
from app.schemas import MAX_ID, AnnotationRead, PromptDetail, PromptPage, PromptRead
from app.services.projects import get_project

MAX_PAGE = 500


def list_prompts(
    session: Session, *, project_slug: str, after: str | None, limit: int
) -> PromptPage:
    """Prompts in id order, ``limit`` at a time; ``after`` is the previous page's ``next``."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    cursor = 0
    if after:
        if not (after.isascii() and after.isdigit()) or int(after) > MAX_ID:
            raise InvalidInput("after: not a cursor returned by this endpoint")
        cursor = int(after)
    project = get_project(session, slug=project_slug)
    rows = list(
        session.scalars(
            select(Prompt)
            .where(Prompt.project_id == project.id, Prompt.id > cursor)
            .order_by(Prompt.id)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return PromptPage(
        items=[PromptRead.model_validate(p) for p in rows],
        next=str(rows[-1].id) if more else None,
    )


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
