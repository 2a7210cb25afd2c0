"""Gauges read from the database when ``GET /metrics`` is scraped."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import GenerationJob, JobStatus, Lease, LeaseStatus, Project, Prompt, utcnow


@dataclass(frozen=True, slots=True)
class DatabaseGauges:
    queue_prompts: dict[str, int] = field(default_factory=dict)
    """Per project slug: prompts with fewer submitted annotations than the overlap."""
    live_leases: dict[str, int] = field(default_factory=dict)
    """Per project slug: open leases not yet expired."""
    jobs: dict[str, int] = field(default_factory=dict)
    """Per status (every status listed, 0 included): generation jobs."""


def database_gauges(session: Session) -> DatabaseGauges:
    """Queue depth and live leases per project, generation jobs per status (one read-only
    transaction, ended here)."""
    try:
        slugs = dict(session.execute(select(Project.id, Project.slug)).all())
        queue = dict(
            session.execute(
                select(Prompt.project_id, func.count())
                .join(Project, Project.id == Prompt.project_id)
                .where(Prompt.annotation_count < Project.overlap)
                .group_by(Prompt.project_id)
            ).all()
        )
        leases = dict(
            session.execute(
                select(Lease.project_id, func.count())
                .where(Lease.status == LeaseStatus.open, Lease.expires_at > utcnow())
                .group_by(Lease.project_id)
            ).all()
        )
        jobs = dict(
            session.execute(
                select(GenerationJob.status, func.count()).group_by(GenerationJob.status)
            ).all()
        )
    finally:
        session.rollback()
    return DatabaseGauges(
        queue_prompts={slug: queue.get(pid, 0) for pid, slug in slugs.items()},
        live_leases={slug: leases.get(pid, 0) for pid, slug in slugs.items()},
        jobs={str(status): jobs.get(status, 0) for status in JobStatus},
    )
