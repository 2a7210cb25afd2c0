"""Generation jobs: created by the API/CLI, run by ``prefero worker`` (``app.worker``).

The request path only creates, reads and cancels jobs. The worker claims a job, reads prompts
in batches after the job's ``cursor`` and saves each batch's completions together with the new
cursor in one transaction, so a worker killed at any moment loses at most the batch it was
generating and never writes a completion twice (completion ids are also unique per job slot).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.db import insert_skipping_duplicates
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Completion, GenerationJob, JobStatus, Project, Prompt, User, Worker, utcnow
from app.schemas import JobCreate, ProjectDetail
from app.services import audit
from app.services.projects import get_project, list_project_details
from app.services.transactions import write_transaction

MAX_JOB_ERRORS = 100
WORKER_ALIVE = timedelta(seconds=30)
"""A worker whose heartbeat is older than this is considered gone."""
JOB_STALE = timedelta(seconds=120)
"""A running job without a heartbeat for this long is reclaimed by another worker."""
FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
UNFINISHED = (JobStatus.queued, JobStatus.running)
MAX_OLDER_UNFINISHED = 200
"""How many unfinished jobs older than the newest ones :func:`recent_jobs` adds, at most."""


def completion_external_id(job_id: int, slot: int) -> str:
    """The id of the completion generated for ``slot`` (0…k-1) of a prompt by a job."""
    return f"gen-{job_id}-{slot}"


# --------------------------------------------------------------------------- request path


def create_job(
    session: Session,
    *,
    project_slug: str,
    data: JobCreate,
    user_id: int | None = None,
    actor: User | None = None,
) -> GenerationJob:
    """Queue a job. ``prompt_ids`` must belong to the project; the default is every prompt
    that exists now (prompts imported later are not included). ``actor`` (None: the command
    line) is the job's creator and is recorded in the audit log."""
    write_transaction(session)
    project = get_project(session, slug=project_slug)
    last = session.scalar(select(func.max(Prompt.id)).where(Prompt.project_id == project.id)) or 0
    prompt_ids = None
    if data.prompt_ids is not None:
        prompt_ids = sorted(set(data.prompt_ids))
        found: set[int] = set()
        for i in range(0, len(prompt_ids), 1000):
            chunk = prompt_ids[i : i + 1000]
            found.update(
                session.scalars(
                    select(Prompt.id).where(Prompt.project_id == project.id, Prompt.id.in_(chunk))
                )
            )
        missing = [p for p in prompt_ids if p not in found]
        if missing:
            session.rollback()
            shown = ", ".join(map(str, missing[:20]))
            raise InvalidInput(f"prompt_ids not in project {project.slug!r}: {shown}")
        total = len(prompt_ids)
    else:
        total = session.scalar(select(func.count()).where(Prompt.project_id == project.id)) or 0
    if total == 0:
        session.rollback()
        raise InvalidInput(f"project {project.slug!r} has no prompts to generate for")
    job = GenerationJob(
        project_id=project.id,
        status=JobStatus.queued,
        backend=data.backend,
        models=data.model_list(),
        k=data.k or project.completions_per_task,
        params=data.params.model_dump(),
        prompt_ids=prompt_ids,
        last_prompt_id=last,
        total=total,
        created_by_id=user_id if user_id is not None else actor.id if actor else None,
    )
    session.add(job)
    session.flush()
    audit.record_project(
        session,
        actor=actor,
        action="job.create",
        project=project,
        job_id=job.id,
        backend=job.backend,
        models=job.models,
        k=job.k,
        prompts=total,
        params=job.params,
    )
    session.commit()
    return job


def get_job(session: Session, *, job_id: int) -> GenerationJob:
    job = session.get(GenerationJob, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session, *, project_slug: str, limit: int = 100, offset: int = 0
) -> list[GenerationJob]:
    """The project's jobs, newest first."""
    project = get_project(session, slug=project_slug)
    query = (
        select(GenerationJob)
        .where(GenerationJob.project_id == project.id)
        .order_by(GenerationJob.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


def cancel_job(session: Session, *, job_id: int, actor: User | None = None) -> GenerationJob:
    """A queued job is cancelled at once; a running one stops after its current batch."""
    write_transaction(session)
    job = _locked_job(session, job_id)
    if job is None:
        session.rollback()
        raise NotFound(f"job {job_id} not found")
    if job.status in FINISHED:
        session.rollback()
        raise Conflict(f"job {job_id} has already finished ({job.status.value})")
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
        job.message = "cancelled before it started"
    job.cancel_requested = True
    project = session.get_one(Project, job.project_id)
    audit.record_project(
        session,
        actor=actor,
        action="job.cancel",
        project=project,
        job_id=job.id,
        status=job.status.value,
    )
    session.commit()
    return job


def pending_generation(session: Session, *, project_id: int) -> int:
    """Prompts still waiting for generation in unfinished jobs of a project."""
    rows = session.execute(
        select(GenerationJob.total, GenerationJob.done).where(
            GenerationJob.project_id == project_id,
            GenerationJob.status.in_((JobStatus.queued, JobStatus.running)),
        )
    )
    return sum(max(total - done, 0) for total, done in rows)


def pending_generation_by_project(session: Session) -> dict[int, int]:
    """:func:`pending_generation` of every project, in one query (projects with none are left
    out)."""
    remaining = case(
        (GenerationJob.total > GenerationJob.done, GenerationJob.total - GenerationJob.done),
        else_=0,
    )
    rows = session.execute(
        select(GenerationJob.project_id, func.sum(remaining))
        .where(GenerationJob.status.in_(UNFINISHED))
        .group_by(GenerationJob.project_id)
    )
    return {project_id: int(n) for project_id, n in rows if n}


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A job with the project it belongs to."""

    job: GenerationJob
    project_slug: str
    project_name: str

    @property
    def unfinished(self) -> bool:
        return self.job.status in UNFINISHED


def recent_jobs(session: Session, *, limit: int = 20) -> list[JobSummary]:
    """The newest ``limit`` jobs of all projects, plus every older job still queued or running
    (up to :data:`MAX_OLDER_UNFINISHED`), newest first: nothing in progress is left out."""
    query = select(GenerationJob, Project.slug, Project.name).join(
        Project, GenerationJob.project_id == Project.id
    )
    rows = list(session.execute(query.order_by(GenerationJob.id.desc()).limit(limit)))
    if rows and len(rows) == limit:
        rows += session.execute(
            query.where(GenerationJob.id < rows[-1][0].id, GenerationJob.status.in_(UNFINISHED))
            .order_by(GenerationJob.id.desc())
            .limit(MAX_OLDER_UNFINISHED)
        ).all()
    return [JobSummary(job, slug, name) for job, slug, name in rows]


@dataclass(frozen=True, slots=True)
class ProjectOverview:
    project: ProjectDetail
    pending_generation: int
    """Prompts still waiting for generation (see :func:`pending_generation`)."""


@dataclass(frozen=True, slots=True)
class AdminOverview:
    """What the admin page shows: every project with its counts, the recent jobs."""

    projects: list[ProjectOverview]
    jobs: list[JobSummary]
    live_workers: int

    @property
    def queued_jobs(self) -> int:
        return sum(1 for j in self.jobs if j.job.status == JobStatus.queued)


def admin_overview(session: Session, *, job_limit: int = 20) -> AdminOverview:
    """Projects with their counts and pending generation, and the recent jobs (see
    :func:`recent_jobs`): a fixed number of queries however many projects there are."""
    pending = pending_generation_by_project(session)
    projects = [
        ProjectOverview(detail, pending.get(detail.id, 0))
        for detail in list_project_details(session)
    ]
    return AdminOverview(
        projects=projects,
        jobs=recent_jobs(session, limit=job_limit),
        live_workers=live_workers(session),
    )


# --------------------------------------------------------------------------- worker side


def _locked_job(session: Session, job_id: int) -> GenerationJob | None:
    return session.scalar(select(GenerationJob).where(GenerationJob.id == job_id).with_for_update())


def register_worker(session: Session, *, name: str) -> None:
    write_transaction(session)
    session.execute(delete(Worker).where(Worker.name == name))
    session.add(Worker(name=name))
    session.commit()


def worker_heartbeat(session: Session, *, name: str, job_id: int | None = None) -> bool:
    """Refresh the worker's (and its job's) heartbeat. False if the job was cancelled or taken
    over by another worker, meaning this worker must stop working on it."""
    write_transaction(session)
    now = utcnow()
    session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=now))
    ours = True
    if job_id is not None:
        result = session.execute(
            update(GenerationJob)
            .where(
                GenerationJob.id == job_id,
                GenerationJob.worker == name,
                GenerationJob.status == JobStatus.running,
                GenerationJob.cancel_requested.is_(False),
            )
            .values(heartbeat_at=now)
        )
        ours = result.rowcount == 1
    session.commit()
    return ours


def unregister_worker(session: Session, *, name: str) -> None:
    write_transaction(session)
    session.execute(delete(Worker).where(Worker.name == name))
    session.commit()


def reap_workers(session: Session, *, dead: list[str]) -> int:
    """Forget workers known to be dead and queue their running jobs again at once (instead of
    waiting for the heartbeat to go stale). Returns how many jobs were requeued."""
    if not dead:
        return 0
    write_transaction(session)
    result = session.execute(
        update(GenerationJob)
        .where(GenerationJob.worker.in_(dead), GenerationJob.status == JobStatus.running)
        .values(status=JobStatus.queued, worker=None, heartbeat_at=None)
    )
    session.execute(delete(Worker).where(Worker.name.in_(dead)))
    session.commit()
    return result.rowcount


def worker_names(session: Session) -> list[str]:
    return list(session.scalars(select(Worker.name)))


def live_workers(session: Session) -> int:
    since = utcnow() - WORKER_ALIVE
    return session.scalar(select(func.count()).where(Worker.heartbeat_at >= since)) or 0


def claim_job(session: Session, *, worker: str, job_id: int | None = None) -> GenerationJob | None:
    """Take the oldest queued job (or a running one whose worker died), or ``job_id``.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` so workers never wait on each other; SQLite: the
    write lock taken by ``BEGIN IMMEDIATE`` serialises claims. An idle worker polls with a
    plain read and takes no lock when there is nothing to claim.
    """
    now = utcnow()
    claimable = or_(
        GenerationJob.status == JobStatus.queued,
        (GenerationJob.status == JobStatus.running)
        & or_(GenerationJob.heartbeat_at.is_(None), GenerationJob.heartbeat_at < now - JOB_STALE),
    )
    query = select(GenerationJob).where(claimable, GenerationJob.cancel_requested.is_(False))
    if job_id is not None:
        query = query.where(GenerationJob.id == job_id)
    if (
        session.scalar(select(query.with_only_columns(GenerationJob.id).limit(1).exists()))
        is not True
    ):
        session.rollback()
        return None
    write_transaction(session)
    job = session.scalar(
        query.order_by(GenerationJob.id).limit(1).with_for_update(skip_locked=True)
    )
    if job is None:
        session.rollback()
        return None
    job.status = JobStatus.running
    job.worker = worker
    job.heartbeat_at = now
    job.started_at = job.started_at or now
    session.commit()
    return job


@dataclass(frozen=True, slots=True)
class PromptToGenerate:
    id: int
    messages: list[dict[str, str]]
    existing_texts: list[str]


@dataclass(frozen=True, slots=True)
class JobContext:
    job: GenerationJob
    system_prompt: str
    instruction_template: str


def job_context(session: Session, *, job_id: int) -> JobContext:
    job = get_job(session, job_id=job_id)
    project = session.get(Project, job.project_id)
    assert project is not None  # job rows are deleted with their project
    session.expunge(job)  # a detached, fully loaded snapshot for the worker
    session.rollback()
    return JobContext(job, project.system_prompt, project.instruction_template)


def next_prompts(
    session: Session, *, job: GenerationJob, cursor: int, limit: int
) -> list[PromptToGenerate]:
    """The next ``limit`` prompts of the job after ``cursor``, with their current texts."""
    query = select(Prompt.id, Prompt.messages).where(
        Prompt.project_id == job.project_id, Prompt.id > cursor
    )
    if job.prompt_ids is not None:
        ids = [i for i in job.prompt_ids if i > cursor][:limit]
        query = query.where(Prompt.id.in_(ids))
    else:
        query = query.where(Prompt.id <= job.last_prompt_id)
    rows = session.execute(query.order_by(Prompt.id).limit(limit)).all()
    texts: dict[int, list[str]] = {pid: [] for pid, _ in rows}
    if rows:
        for pid, text in session.execute(
            select(Completion.prompt_id, Completion.text).where(Completion.prompt_id.in_(texts))
        ):
            texts[pid].append(text)
    return [PromptToGenerate(pid, messages, texts[pid]) for pid, messages in rows]


@dataclass(slots=True)
class NewCompletion:
    prompt_id: int
    slot: int
    text: str
    model: str
    backend: str
    input_text: str
    params: dict[str, Any]


def save_batch(
    session: Session,
    *,
    job_id: int,
    worker: str,
    completions: list[NewCompletion],
    cursor: int,
    prompts_done: int,
    dropped: int = 0,
    errors: list[dict[str, Any]] | None = None,
) -> bool:
    """Write one batch's completions and advance the job, atomically. Returns False (and
    writes nothing) when the job is no longer this worker's or was cancelled."""
    write_transaction(session)
    job = _locked_job(session, job_id)
    if (
        job is None
        or job.worker != worker
        or job.status != JobStatus.running
        or job.cancel_requested
        or cursor <= job.cursor
    ):
        session.rollback()
        return False
    created = 0
    if completions:
        table = Completion.__table__
        now = utcnow()
        rows = [
            {
                "prompt_id": c.prompt_id,
                "external_id": completion_external_id(job_id, c.slot),
                "text": storable(c.text),
                "model": c.model,
                "backend": c.backend,
                "input_text": storable(c.input_text),
                "params": c.params,
                "job_id": job_id,
                "created_at": now,
            }
            for c in completions
        ]
        stmt = insert_skipping_duplicates(
            session, table, table.c.prompt_id, table.c.external_id
        ).returning(table.c.id)
        created = len(session.execute(stmt, rows).all())
    job.cursor = cursor
    job.done += prompts_done
    job.completions_created += created
    job.duplicates_dropped += dropped
    if errors:
        job.errors = [*job.errors, *errors][:MAX_JOB_ERRORS]
    job.heartbeat_at = utcnow()
    session.commit()
    return True


def finish_job(session: Session, *, job_id: int, worker: str, failure: str | None = None) -> None:
    """Mark the job finished: failed with ``failure``, cancelled if that was asked for, failed
    if some prompts failed, else succeeded."""
    write_transaction(session)
    job = _locked_job(session, job_id)
    if job is None or job.worker != worker or job.status != JobStatus.running:
        session.rollback()
        return
    if failure is not None:
        job.status, job.message = JobStatus.failed, failure
    elif job.cancel_requested:
        job.status, job.message = JobStatus.cancelled, f"cancelled after {job.done} prompts"
    elif job.errors:
        job.status = JobStatus.failed
        job.message = f"{len(job.errors)} prompts failed; first: {job.errors[0]['message']}"
    else:
        job.status, job.message = JobStatus.succeeded, ""
    job.finished_at = utcnow()
    session.commit()


def release_job(session: Session, *, job_id: int, worker: str) -> None:
    """Give a running job back to the queue (the worker is shutting down)."""
    write_transaction(session)
    session.execute(
        update(GenerationJob)
        .where(
            GenerationJob.id == job_id,
            GenerationJob.worker == worker,
            GenerationJob.status == JobStatus.running,
        )
        .values(status=JobStatus.queued, worker=None, heartbeat_at=None)
    )
    session.commit()


def storable(text: str) -> str:
    """Model output as both databases can store it: no NUL characters, valid Unicode."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """What counts as 'the same completion' when de-duplicating."""
    return _SPACE.sub(" ", text).strip().casefold()
