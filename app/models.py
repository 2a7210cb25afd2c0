"""ORM models (SQLAlchemy 2 typed declarative). Pydantic schemas live in ``app.schemas``.

Tables are singular snake_case, timestamps end in ``_at`` and are stored in UTC. The schema
changes only through Alembic migrations in ``migrations/versions``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, IdType, JSONType

DEFAULT_FLAGS: tuple[str, ...] = (
    "fails to follow the instruction",
    "hallucination",
    "inappropriate for a customer assistant",
    "harmful advice",
    "sexual content",
    "violent content",
    "denigrates a protected class",
    "expresses a moral judgement",
)
"""The InstructGPT labeling metadata (Ouyang et al. 2022, Table 3)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Timestamp(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores them as naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Role(enum.StrEnum):
    admin = "admin"
    annotator = "annotator"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class AnnotationStatus(enum.StrEnum):
    submitted = "submitted"
    skipped = "skipped"


class LeaseStatus(enum.StrEnum):
    open = "open"
    """Held by its annotator; live until ``expires_at``, then reclaimed by the next request."""
    submitted = "submitted"
    skipped = "skipped"
    expired = "expired"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        length=16,
        validate_strings=True,
        values_callable=lambda e: [m.value for m in e],
        create_constraint=True,
    )


class User(Base):
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp())
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp())

    user: Mapped[User] = relationship(back_populates="tokens")


class Project(Base):
    __tablename__ = "project"
    __table_args__ = (
        CheckConstraint("completions_per_task BETWEEN 2 AND 9", name="k_range"),
        CheckConstraint("overlap >= 1", name="overlap_positive"),
        CheckConstraint("lease_seconds >= 30", name="lease_min"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    completions_per_task: Mapped[int] = mapped_column(Integer, default=4)
    overlap: Mapped[int] = mapped_column(Integer, default=3)
    allow_ties: Mapped[bool] = mapped_column(Boolean, default=True)
    likert: Mapped[bool] = mapped_column(Boolean, default=True)
    flags: Mapped[list[Any]] = mapped_column(JSONType, default=lambda: list(DEFAULT_FLAGS))
    require_rationale: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_seconds: Mapped[int] = mapped_column(Integer, default=600)
    system_prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    """Sent to the model before each prompt when generating (not shown to annotators)."""
    instruction_template: Mapped[str] = mapped_column(Text, default="", server_default="")
    """Wraps the last user message for generation; ``{prompt}`` marks where it goes."""
    members_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    """Only users in ``project_member`` may label (otherwise every active user may)."""
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)


class ProjectMember(Base):
    __tablename__ = "project_member"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("project.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)


class Prompt(Base):
    __tablename__ = "prompt"
    __table_args__ = (
        UniqueConstraint("project_id", "external_id"),
        Index(None, "project_id", "id"),  # keyset pagination and export by project
        # The task queue: prompts with most annotations first, below the overlap.
        Index("ix_prompt_queue", "project_id", "annotation_count", "id"),
        CheckConstraint("annotation_count >= 0", name="annotation_count_nonnegative"),
        CheckConstraint("open_leases >= 0", name="open_leases_nonnegative"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    messages: Mapped[list[Any]] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    annotation_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Submitted annotations (first revisions), kept by the task service."""
    open_leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Leases in status ``open`` (live, or expired and not yet reclaimed)."""
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)

    completions: Mapped[list[Completion]] = relationship(
        back_populates="prompt", order_by="Completion.id"
    )


class Completion(Base):
    __tablename__ = "completion"
    __table_args__ = (UniqueConstraint("prompt_id", "external_id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    backend: Mapped[str | None] = mapped_column(String(32))
    input_text: Mapped[str | None] = mapped_column(Text)
    """Exactly what was sent to the model (generated completions only)."""
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("generation_job.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)

    prompt: Mapped[Prompt] = relationship(back_populates="completions")


class GenerationJob(Base):
    """A request to generate ``k`` completions for each selected prompt of a project.

    Run by a worker process. Progress is committed with each batch of prompts (``cursor`` is
    the last prompt id done), so a restarted worker resumes where the dead one stopped and
    never writes a completion twice.
    """

    __tablename__ = "generation_job"
    __table_args__ = (
        Index(None, "status", "id"),
        Index(None, "project_id", "id"),
        CheckConstraint("k BETWEEN 1 AND 16", name="k_range"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.queued
    )
    backend: Mapped[str] = mapped_column(String(32))
    models: Mapped[list[Any]] = mapped_column(JSONType)
    k: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prompt_ids: Mapped[list[Any] | None] = mapped_column(JSONType)
    """The prompts to generate for; null = every prompt with id ≤ ``last_prompt_id``."""
    last_prompt_id: Mapped[int] = mapped_column(IdType, default=0)
    cursor: Mapped[int] = mapped_column(IdType, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    completions_created: Mapped[int] = mapped_column(Integer, default=0)
    duplicates_dropped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    message: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp())
    heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp())


class Worker(Base):
    """A running ``prefero worker`` process; ``heartbeat_at`` tells whether it is alive."""

    __tablename__ = "worker"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow, index=True)


class Lease(Base):
    """A prompt handed to one annotator until ``expires_at``, with the order it was shown in.

    ``prompt.annotation_count + prompt.open_leases <= project.overlap`` is kept by the task
    service under a row lock on the prompt; an annotator has at most one lease per prompt.
    """

    __tablename__ = "lease"
    __table_args__ = (
        UniqueConstraint("user_id", "prompt_id"),
        Index(None, "status", "expires_at"),
        Index(None, "user_id", "project_id", "status"),
        # The user's live leases in every project (the per-user lease cap), counted without
        # reading their closed ones.
        Index(
            "ix_lease_open_user_id",
            "user_id",
            "expires_at",
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    status: Mapped[LeaseStatus] = mapped_column(
        _enum(LeaseStatus, "lease_status"), default=LeaseStatus.open
    )
    display_order: Mapped[list[Any]] = mapped_column(JSONType)
    """Completion ids in the order they were shown (labels A, B, C, … in this order)."""
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(Timestamp())
    closed_at: Mapped[datetime | None] = mapped_column(Timestamp())


class WebSession(Base):
    """A browser login. The cookie holds a random secret; only its SHA-256 is stored."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(Timestamp(), index=True)


class LoginFailure(Base):
    """A failed login, kept for the rate limit (failures per minute per username and per IP)."""

    __tablename__ = "login_failure"
    __table_args__ = (
        Index(None, "username", "created_at"),
        Index(None, "ip", "created_at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    username: Mapped[str] = mapped_column(String(200))
    ip: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)


class Annotation(Base):
    """One annotator's judgement of one prompt.

    Rows are never updated in place: a correction is a new row with ``revision`` + 1 and
    ``supersedes_id`` pointing at the row it replaces, so the full history is kept. The current
    annotation of a (prompt, user) is the one with the highest revision; revision 1 is unique
    per (prompt, user), which is what makes a retried submit idempotent.
    """

    __tablename__ = "annotation"
    __table_args__ = (
        UniqueConstraint("prompt_id", "user_id", "revision"),
        CheckConstraint("revision >= 1", name="revision_positive"),
        Index(None, "project_id", "id"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    lease_id: Mapped[int | None] = mapped_column(
        ForeignKey("lease.id", ondelete="SET NULL"), unique=True
    )
    revision: Mapped[int] = mapped_column(Integer, default=1)
    supersedes_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotation.id", ondelete="SET NULL"), unique=True
    )
    status: Mapped[AnnotationStatus] = mapped_column(_enum(AnnotationStatus, "status"))
    ranking: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    likert: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    flags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    rationale: Mapped[str] = mapped_column(Text, default="")
    display_order: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    strength: Mapped[int | None] = mapped_column(Integer)
    """Pairwise tasks (K = 2): 1 = slightly better, 2 = much better (null: not asked)."""
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    """Pairwise tasks: the annotator judged both completions bad (stored as a tie)."""
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)


class AuditEvent(Base):
    """An admin action: who did what to which project or user, and when.

    Written by ``app.services.audit.record`` in the same transaction as the action it records
    (both commit or neither does). Append-only: nothing updates or deletes these rows.
    ``actor`` is the acting user's name at the time (``"cli"`` for the command line), and
    ``details`` never holds secrets or prompt, completion or annotation text.
    """

    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_event_actor", "actor", "id"),
        Index("ix_audit_event_action", "action", "id"),
        Index("ix_audit_event_target", "target_type", "target_label", "id"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp(), default=utcnow)
    actor_id: Mapped[int | None] = mapped_column(IdType)
    """The acting user's id (no foreign key: the log outlives what it mentions)."""
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[int | None] = mapped_column(IdType)
    target_label: Mapped[str] = mapped_column(String(200))
    """The project's slug or the user's name."""
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
