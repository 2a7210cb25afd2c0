"""Small factories for tests. Each commits, which inside the per-test transaction only
releases a SAVEPOINT, so a later service rollback cannot undo the fixture data."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.deps import get_session
from app.models import (
    Annotation,
    AnnotationStatus,
    ApiToken,
    Completion,
    Project,
    Prompt,
    Role,
    User,
)
from app.security import hash_password, hash_token, new_token

PASSWORD = "correct horse battery"
_PASSWORD_HASH = hash_password(PASSWORD)  # argon2 is slow on purpose: hash once per run
_seq = itertools.count(1)


def make_user(
    session: Session,
    *,
    role: Role = Role.annotator,
    username: str | None = None,
    active: bool = True,
) -> User:
    user = User(
        username=username or f"user{next(_seq)}",
        role=role,
        active=active,
        password_hash=_PASSWORD_HASH,
    )
    session.add(user)
    session.commit()
    return user


def make_token(session: Session, user: User, *, name: str = "test") -> str:
    secret = new_token()
    session.add(ApiToken(user_id=user.id, name=name, token_hash=hash_token(secret)))
    session.commit()
    return secret


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def make_admin_headers(session: Session) -> dict[str, str]:
    return auth(make_token(session, make_user(session, role=Role.admin)))


def make_project(session: Session, **overrides: Any) -> Project:
    n = next(_seq)
    fields: dict[str, Any] = {"name": f"Project {n}", "slug": f"project-{n}"}
    fields.update(overrides)
    project = Project(**fields)
    session.add(project)
    session.commit()
    return project


def make_prompt(
    session: Session,
    project: Project,
    *,
    k: int = 4,
    text: str | None = None,
    external_id: str | None = None,
) -> Prompt:
    n = next(_seq)
    prompt = Prompt(
        project_id=project.id,
        external_id=external_id or f"p{n}",
        messages=[{"role": "user", "content": text or f"Prompt number {n}"}],
        metadata_={},
    )
    prompt.completions = [
        Completion(external_id=f"c{i}", text=f"Completion {i} of prompt {n}", model=f"m{i % 2}")
        for i in range(k)
    ]
    session.add(prompt)
    session.commit()
    return prompt


def make_annotation(session: Session, prompt: Prompt, user: User, **overrides: Any) -> Annotation:
    ids = [c.id for c in prompt.completions]
    fields: dict[str, Any] = {
        "project_id": prompt.project_id,
        "prompt_id": prompt.id,
        "user_id": user.id,
        "status": AnnotationStatus.submitted,
        "ranking": [[i] for i in ids],
        "display_order": ids,
    }
    fields.update(overrides)
    annotation = Annotation(**fields)
    session.add(annotation)
    if annotation.status == AnnotationStatus.submitted and fields.get("revision", 1) == 1:
        # Keep the task-queue counter the task service maintains.
        session.execute(
            update(Prompt)
            .where(Prompt.id == prompt.id)
            .values(annotation_count=Prompt.annotation_count + 1)
        )
    session.commit()
    return annotation


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def row_counts(session: Session) -> dict[str, int]:
    """Rows per table that imports may touch: assert it is unchanged after a rejected request."""
    return {
        m.__tablename__: count(session, m) for m in (Project, Prompt, Completion, User, ApiToken)
    }


def use_session(app: Any, session: Session) -> None:
    """Serve every request of ``app`` from ``session`` (the test's rolled-back transaction):
    the ``get_session`` dependency and the labeling routes' ``app.state.open_session``."""

    def test_session() -> Iterator[Session]:
        yield session

    app.dependency_overrides[get_session] = test_session
    app.state.open_session = lambda: nullcontext(session)
    # the labeling routes' own connections would not see the test's transaction
    app.state.statement_pool = None
