"""Task assignment: who labels which prompt, and recording what they said.

A *task* is a prompt with its first K completions, handed to one annotator as a :class:`Lease`
with the completions in a random order (stored with the lease). The invariants, kept under any
concurrency on both databases:

- a prompt never has more than ``project.overlap`` submitted annotations, and its submitted
  annotations plus its live leases never exceed the overlap;
- an annotator never gets the same prompt twice (skipped and expired ones included);
- expired leases are reclaimed by the next request that needs a task (no cron);
- prompts that already have annotations are served first, so complete sets accumulate.

How: each prompt row carries two counters, ``annotation_count`` (submitted first revisions)
and ``open_leases`` (leases in status ``open``, live or expired-but-not-yet-reclaimed), changed
only here and only while the prompt row is locked. A prompt is a candidate while
``annotation_count + open_leases < overlap``; handing it out adds one to ``open_leases``;
submitting moves one from ``open_leases`` to ``annotation_count``; skipping or reclaiming
an expired lease gives the slot back.

On PostgreSQL the candidate is locked with ``FOR NO KEY UPDATE SKIP LOCKED``: annotators never
wait for each other, they take the next candidate instead, and a locking read re-checks the
counters on the newest row version. (NO KEY UPDATE rather than UPDATE so that inserting
completions, whose foreign key takes KEY SHARE on the prompt, is not blocked.) On SQLite every
writing transaction starts with ``BEGIN IMMEDIATE``, which serialises them. Locks are always
taken lease first, then prompt, and several prompts in id order, so there is no deadlock. The
unique (user, prompt) constraint on leases is the last line of defence against a user getting
a prompt twice from two concurrent requests.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg_pool import PoolTimeout
from sqlalchemy import (
    BigInteger,
    Boolean,
    Interval,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import Precompiled, StatementPool
from app.errors import Conflict, Forbidden, InvalidInput, NotFound, TooManyRequests
from app.models import (
    Annotation,
    AnnotationStatus,
    Completion,
    Lease,
    LeaseStatus,
    Project,
    ProjectMember,
    Prompt,
    Role,
    User,
    utcnow,
)
from app.schemas import (
    LabelContext,
    LeaseRead,
    ProjectProgress,
    SubmitAnnotation,
    Task,
    TaskCompletion,
    TaskPrompt,
)
from app.services.generation import pending_generation
from app.services.transactions import write_transaction

MIN_COMPLETIONS = 2
"""A prompt becomes a task once it has at least this many completions."""
MAX_EXCLUDE = 20
RECLAIM_BATCH = 200
"""Expired leases reclaimed per request at most (the rest by the following requests)."""
RECLAIM_INTERVAL = 1.0
"""Seconds between reclaim passes of one process, besides the pass made whenever a request
finds no candidate (so an expired slot is never withheld from someone who needs it)."""
_last_reclaim = 0.0
QUEUE_HEAD_WINDOW = 64
"""Prompts at the head of the queue (by priority) looked at first for each request."""
LABELS = "ABCDEFGHIJKLMNOP"

_rng = random.SystemRandom()
_spread_rng = random.Random()  # load spreading only: no need for the system's entropy


@dataclass(frozen=True, slots=True)
class Recorded:
    """The outcome of a submit or skip; ``replayed`` when a retry returned the earlier row."""

    annotation_id: int
    lease_id: int
    replayed: bool = False


# --------------------------------------------------------------------------- access


_PROJECT_COLUMNS = (
    Project.id,
    Project.slug,
    Project.overlap,
    Project.completions_per_task,
    Project.lease_seconds,
    Project.members_only,
)


def _labelable_project(session: Session, *, slug: str, user: User) -> Any:
    """The project's task settings (a row: id, slug, overlap, completions_per_task,
    lease_seconds, members_only) if ``user`` may label it."""
    project = session.execute(select(*_PROJECT_COLUMNS).where(Project.slug == slug)).first()
    if project is None:
        raise NotFound(f"project {slug!r} not found")
    if not _may_label(session, project=project, user=user):
        raise Forbidden(f"project {slug!r} is open to its members only")
    return project


def _may_label(session: Session, *, project: Any, user: User) -> bool:
    if not project.members_only or user.role == Role.admin:
        return True
    params = {"project_id": project.id, "user_id": user.id}
    return session.connection().execute(_IS_MEMBER, params).first() is not None


def _visible_projects(session: Session, *, user: User) -> list[Project]:
    query = select(Project).order_by(Project.id)
    if user.role != Role.admin:
        is_member = exists().where(
            ProjectMember.project_id == Project.id, ProjectMember.user_id == user.id
        )
        query = query.where(or_(Project.members_only.is_(False), is_member))
    return list(session.scalars(query))


# --------------------------------------------------------------------------- statements
# The hot paths (next, submit) run statements built once here, on the session's connection:
# no per-request statement construction or ORM bookkeeping, and SQLAlchemy's compiled cache
# (and psycopg's prepared statements) always hit. ``with_for_update`` renders nothing on SQLite.

_P, _C, _L, _A, _PR = (m.__table__ for m in (Prompt, Completion, Lease, Annotation, Project))


_ONE, _ZERO, _TRUE = literal_column("1"), literal_column("0"), literal_column("true")


def _n(value: int) -> Any:
    """A LIMIT/OFFSET written into the SQL: as a parameter, PostgreSQL's cached generic plan
    for the prepared statement would not know it is small and may sort the whole queue."""
    return literal_column(str(int(value)))


_READY = exists(
    select(_ONE).where(_C.c.prompt_id == _P.c.id).limit(_n(1)).offset(_n(MIN_COMPLETIONS - 1))
)
_HAS_FREE_SLOT = (
    # (not "project_id": an UPDATE of prompts would take a parameter of that name as a SET)
    _P.c.project_id == bindparam("in_project"),
    _P.c.annotation_count < bindparam("overlap"),
    _P.c.annotation_count + _P.c.open_leases < bindparam("overlap"),
)
# "OFFSET 0" keeps each check a per-row subplan on its unique index: PostgreSQL cannot turn
# it into a join, whose plan would depend on statistics that a fresh or freshly imported
# project does not have yet (a join planned for an "empty" lease table scans all of a user's
# leases for every candidate).
_NEW_TO_USER = (
    ~exists(
        select(_ONE)
        .where(_L.c.user_id == bindparam("user_id"), _L.c.prompt_id == _P.c.id)
        .offset(_n(0))
    ),
    # "+ 0": probe by prompt (a handful of rows, bounded by the overlap), never by user (all
    # of an annotator's annotations, which a plan made without statistics would otherwise
    # choose through the (user_id, created_at) index, and which grows with their work).
    ~exists(
        select(_ONE)
        .where(_A.c.prompt_id == _P.c.id, (_A.c.user_id + _ZERO) == bindparam("user_id"))
        .offset(_n(0))
    ),
    _READY,
)
# Most-annotated first (complete sets accumulate); the queue index serves this order.
_PRIORITY = (_P.c.annotation_count.desc(), _P.c.id.desc())


def _candidate_query(*extra: Any, order: Any = _PRIORITY, slot: Any = _HAS_FREE_SLOT) -> Any:
    return (
        select(_P.c.id, _P.c.messages)
        .where(*slot, *_NEW_TO_USER, *extra)
        .order_by(*order)
        .limit(_n(1))
        .with_for_update(of=_P, key_share=True, skip_locked=True)
    )


# Three searches, cheapest first. A user's own started prompts rank high (they have
# annotations), so one scan of the whole queue would step over all of them on every request:
# instead look (1) among the prompts at the head of the queue (their ids fetched first, then
# looked up by primary key: a plan that does not depend on statistics), (2) at prompts nobody
# has annotated yet, and (3) only when both find nothing (the end of a project), at the whole
# queue.
_QUEUE_HEAD = (
    select(_P.c.id, _P.c.annotation_count)
    .where(*_HAS_FREE_SLOT)
    .order_by(*_PRIORITY)
    .limit(_n(QUEUE_HEAD_WINDOW))
)
# PostgreSQL: the head's ids are walked in the order fetched (a nested loop over the array,
# each id looked up by primary key), so the per-user checks run only until the first prompt
# that passes and is not locked by someone else — typically one or two rows, not all 64:
# sorting them again would evaluate every check (two index probes) for every head row first
# (0.7 ms of PostgreSQL CPU per request, the most expensive statement of the labeling loop).
# The free-slot re-check (on the locked row's newest version) is written without an indexable
# condition, so the plan stays primary-key lookups, never a scan of the queue index's range.
_HEAD_SLOT = (_P.c.annotation_count + _P.c.open_leases < bindparam("overlap"),)
_ID_ARRAY = postgresql.ARRAY(BigInteger)
_HEAD_IDS = (
    func.unnest(bindparam("head", type_=_ID_ARRAY)).table_valued("id").render_derived(name="head")
)
_IN_HEAD = {
    "postgresql": select(_P.c.id, _P.c.messages)
    .select_from(_HEAD_IDS.join(_P, _P.c.id == _HEAD_IDS.c.id))
    .where(*_HEAD_SLOT, *_NEW_TO_USER)
    .limit(_n(1))
    .with_for_update(of=_P, key_share=True, skip_locked=True),
    # SQLite (one writer at a time, no arrays): the same rows, in priority order; the "+ 0"
    # keeps the queue index out of the plan (the few head rows are looked up by key).
    "sqlite": _candidate_query(
        _P.c.id.in_(bindparam("head", expanding=True)),
        order=((_P.c.annotation_count + 0).desc(), (_P.c.id + 0).desc()),
        slot=_HEAD_SLOT,
    ),
}
_FRESH = _candidate_query(_P.c.annotation_count == 0)
_ANYWHERE = _candidate_query()
_RESUMABLE = (  # the user's live leases in the project
    _L.c.user_id == bindparam("user_id"),
    _L.c.project_id == _PR.c.id,
    _L.c.status == LeaseStatus.open,
    _L.c.expires_at > bindparam("now"),
)
_RESUME = (  # the oldest, outside ``exclude``
    select(_L.c.id)
    .where(*_RESUMABLE, _L.c.id.not_in(bindparam("exclude", expanding=True)))
    .order_by(_L.c.id)
    .limit(_n(1))
    .scalar_subquery()
)
_USER_LIVE = (
    _L.c.user_id == bindparam("user_id"),
    _L.c.status == LeaseStatus.open,
    _L.c.expires_at > bindparam("now"),
)
_FIRST_EXPIRY = select(func.min(_L.c.expires_at)).where(*_USER_LIVE)
_PROJECT_AND_RESUME = select(
    _PR.c.id,
    _PR.c.slug,
    _PR.c.overlap,
    _PR.c.completions_per_task,
    _PR.c.lease_seconds,
    _PR.c.members_only,
    _RESUME.label("resume_id"),
    select(func.count()).where(*_USER_LIVE).scalar_subquery().label("live_leases"),
).where(_PR.c.slug == bindparam("slug"))
# PostgreSQL also reads the head of the project's queue (_QUEUE_HEAD's rows, as JSON pairs
# [id, annotation_count] in priority order) in the same round trip.
_head_rows = (
    select(_P.c.id, _P.c.annotation_count)
    .where(
        _P.c.project_id == _PR.c.id,
        _P.c.annotation_count < _PR.c.overlap,
        _P.c.annotation_count + _P.c.open_leases < _PR.c.overlap,
    )
    .order_by(*_PRIORITY)
    .limit(_n(QUEUE_HEAD_WINDOW))
    .correlate(_PR)
    .subquery("head_rows")
)
_QUEUE_HEAD_OF_PROJECT = select(
    func.json_agg(
        postgresql.aggregate_order_by(
            func.json_build_array(_head_rows.c.id, _head_rows.c.annotation_count),
            _head_rows.c.annotation_count.desc(),
            _head_rows.c.id.desc(),
        )
    )
).scalar_subquery()
_PROJECT_FOR_TASK = {
    "postgresql": _PROJECT_AND_RESUME.add_columns(_QUEUE_HEAD_OF_PROJECT.label("head")),
    "sqlite": _PROJECT_AND_RESUME,
}
_IS_MEMBER = select(ProjectMember.__table__.c.user_id).where(
    ProjectMember.__table__.c.project_id == bindparam("project_id"),
    ProjectMember.__table__.c.user_id == bindparam("user_id"),
)
_FIRST_COMPLETIONS = (
    select(_C.c.id, _C.c.text)
    .where(_C.c.prompt_id == bindparam("prompt_id"))
    .order_by(_C.c.id)
    .limit(bindparam("k"))
)
_INSERT_LEASE = insert(_L).returning(_L.c.id)
_TAKE_SLOT = update(_P).where(_P.c.id == bindparam("pid")).values(open_leases=_P.c.open_leases + 1)
_GIVE_SLOT_BACK = (
    update(_P)
    .where(_P.c.id == bindparam("pid"))
    .values(open_leases=_P.c.open_leases - bindparam("n"))
)
_COUNT_ANNOTATION = (
    update(_P)
    .where(_P.c.id == bindparam("pid"), _P.c.annotation_count < bindparam("overlap"))
    .values(annotation_count=_P.c.annotation_count + 1, open_leases=_P.c.open_leases - 1)
)
_LOCK_LEASE = (
    select(
        _L.c.id,
        _L.c.user_id,
        _L.c.prompt_id,
        _L.c.project_id,
        _L.c.status,
        _L.c.display_order,
        _L.c.expires_at,
        _PR.c.overlap,
        _PR.c.allow_ties,
        _PR.c.likert,
        _PR.c.flags,
        _PR.c.require_rationale,
        _PR.c.lease_seconds,
    )
    .join(_PR, _PR.c.id == _L.c.project_id)
    .where(_L.c.id == bindparam("lease_id"))
    .with_for_update(of=_L)
)
_CLOSE_LEASE = (
    update(_L)
    .where(_L.c.id == bindparam("lid"))
    .values(status=bindparam("new_status"), closed_at=bindparam("closed"))
)
_INSERT_ANNOTATION = insert(_A).returning(_A.c.id)


def _typed(table: Any, names: Sequence[str]) -> list[Any]:
    """Bound parameters ``v_<column>``, typed like ``table``'s columns (cast, so that
    PostgreSQL knows their types inside a SELECT list). Not the columns' own names: SQLAlchemy
    would take a parameter named like a column of an UPDATE's table as a value to SET."""
    return [cast(bindparam(f"v_{n}", type_=table.c[n].type), table.c[n].type) for n in names]


def _prefixed(values: dict[str, Any]) -> dict[str, Any]:
    return {f"v_{k}": v for k, v in values.items()}


def _jsonb(name: str) -> Any:
    return bindparam(name, type_=postgresql.JSONB)


def _flag(name: str) -> Any:
    return bindparam(name, type_=Boolean)


# PostgreSQL: the writes of a new lease, and of a submit, as one statement each (data-modifying
# CTEs that feed each other through RETURNING): one round trip instead of two or three, so the
# prompt's row lock is held for one statement and the commit. SQLite runs them one by one.
_LEASE_COLUMNS = (
    "project_id", "prompt_id", "user_id", "status", "display_order", "created_at",
    "expires_at", "closed_at",
)  # fmt: skip


def _pick_and_lease(candidate: Any, project: Any = None) -> Any:
    """PostgreSQL: ``candidate`` (a locking, SKIP LOCKED select of one prompt's id and
    messages) and everything a new lease writes, as one statement: the prompt locked, its first
    ``k`` completions (by id) put in a random order, its slot taken, the lease inserted; back
    comes one row (prompt id, messages, lease id, display order, expiry, the shown completions
    as JSON pairs [id, text]), or none when there is no candidate. It needs no transaction
    around it (one round trip, and the prompt's row lock lasts for that one statement). The
    project's id, ``k`` and lease time are parameters, or come from ``project`` (a CTE of one
    row with ``id``, ``k`` and ``lease_seconds``)."""
    if project is None:
        project_id, k = _typed(_L, ("project_id",))[0], bindparam("k")
        user_id, status, created_at, expires_at, closed_at = _typed(
            _L, ("user_id", "status", "created_at", "expires_at", "closed_at")
        )
    else:
        # Short SQL (psycopg converts and caches statements of up to 4 kB only): the dialect
        # writes each typed parameter with its type already (%(v_user_id)s::BIGINT).
        project_id = select(project.c.id).scalar_subquery()
        k = select(project.c.k).scalar_subquery()
        seconds = select(project.c.lease_seconds).scalar_subquery()
        user_id, status, created_at = (
            bindparam(f"v_{n}", type_=_L.c[n].type) for n in ("user_id", "status", "created_at")
        )
        expires_at = created_at + seconds * literal_column("interval '1 second'", Interval())
        closed_at = null()
    picked = candidate.cte("picked")
    shown = (
        select(_C.c.id, _C.c.text)
        .where(_C.c.prompt_id == select(picked.c.id).scalar_subquery())
        .order_by(_C.c.id)
        .limit(k)
        .cte("shown")
    )
    slot = (
        update(_P)
        .where(_P.c.id == picked.c.id)
        .values(open_leases=_P.c.open_leases + 1)
        .returning(_P.c.id)
        .cte("slot")
    )
    display_order = select(
        func.jsonb_agg(postgresql.aggregate_order_by(shown.c.id, func.random()))
    ).scalar_subquery()
    lease = (
        insert(_L)
        .from_select(
            _LEASE_COLUMNS,
            select(
                project_id,
                slot.c.id,
                user_id,
                status,
                display_order,
                created_at,
                expires_at,
                closed_at,
            ),
        )
        .returning(_L.c.id, _L.c.display_order, _L.c.expires_at)
        .cte("lease")
    )
    shown_json = select(
        func.json_agg(func.json_build_array(shown.c.id, shown.c.text))
    ).scalar_subquery()
    return select(
        picked.c.id,
        picked.c.messages,
        lease.c.id.label("lease_id"),
        lease.c.display_order,
        lease.c.expires_at,
        shown_json.label("shown"),
    ).select_from(picked.join(lease, _TRUE))


_PICK_AND_LEASE = {
    "head": _pick_and_lease(_IN_HEAD["postgresql"]),
    "fresh": _pick_and_lease(_FRESH),
    "anywhere": _pick_and_lease(_ANYWHERE),
}


def _next_in_one_statement_query(head_window: int = QUEUE_HEAD_WINDOW) -> Any:
    """PostgreSQL: the common case of :func:`next_task` as one statement — the project (by
    slug) when this user may label it, holds no open lease in it (outside ``exclude``) and is
    below ``max_open`` live leases; the head of its queue, most annotated first and in random
    order among equals (see :func:`_spread`), walked in that order; and a new lease on the
    first prompt there that is new to the user and not locked by another request
    (:func:`_pick_and_lease`), else on the newest prompt nobody has annotated yet. No row: one
    of those did not hold (an unknown project, a non-member, a lease to resume, too many
    leases, nothing new to this user in the head nor untouched): the caller then takes the way
    of several statements, which tells them apart."""
    is_member = exists(
        select(_ONE).where(
            ProjectMember.__table__.c.project_id == _PR.c.id,
            ProjectMember.__table__.c.user_id == bindparam("user_id"),
        )
    )
    live = select(func.count()).where(*_USER_LIVE).scalar_subquery()
    project = (
        select(
            _PR.c.id,
            _PR.c.overlap,
            _PR.c.completions_per_task.label("k"),
            _PR.c.lease_seconds,
        )
        .where(
            _PR.c.slug == bindparam("slug"),
            or_(~_PR.c.members_only, _flag("is_admin"), is_member),
            # the lease to resume, with ``exclude`` as one array (SQL of a fixed length)
            ~exists(
                select(_ONE).where(
                    *_RESUMABLE, _L.c.id != func.all(bindparam("exclude_ids", type_=_ID_ARRAY))
                )
            ),
            live < bindparam("max_open"),
        )
        .cte("proj")
    )
    # As parameters of the plan (InitPlans): the queue index then serves the head in order.
    project_id = select(project.c.id).scalar_subquery()
    overlap = select(project.c.overlap).scalar_subquery()
    head = (
        select(_P.c.id, _P.c.annotation_count)
        .where(
            _P.c.project_id == project_id,
            _P.c.annotation_count < overlap,
            _P.c.annotation_count + _P.c.open_leases < overlap,
        )
        .order_by(*_PRIORITY)
        .limit(_n(head_window))
        .subquery("head")
    )
    # A sorted subquery is not merged into the join: its order drives the nested loop, whose
    # primary-key lookups run only until the first prompt that passes and is not locked.
    spread = (
        select(head.c.id).order_by(head.c.annotation_count.desc(), func.random()).subquery("spread")
    )
    in_head = (
        select(_P.c.id, _P.c.messages)
        .select_from(spread.join(_P, _P.c.id == spread.c.id))
        .where(_P.c.annotation_count + _P.c.open_leases < overlap, *_NEW_TO_USER)
        .limit(_n(1))
        .with_for_update(of=_P, key_share=True, skip_locked=True)
        .cte("in_head")
    )
    # Only when the head has nothing for this user (e.g. a lone annotator, whose own started
    # prompts fill it): a prompt nobody has annotated yet, like the search of several
    # statements does next.
    fresh = (
        select(_P.c.id, _P.c.messages)
        .where(
            _P.c.project_id == project_id,
            _P.c.annotation_count == _ZERO,
            _P.c.open_leases < overlap,
            *_NEW_TO_USER,
            ~exists(select(in_head.c.id)),
        )
        .order_by(*_PRIORITY)
        .limit(_n(1))
        .with_for_update(of=_P, key_share=True, skip_locked=True)
        .cte("fresh")
    )
    candidate = select(in_head.c.id, in_head.c.messages).union_all(
        select(fresh.c.id, fresh.c.messages)
    )
    return _pick_and_lease(candidate, project)


_NEXT_IN_ONE_STATEMENT = Precompiled(_next_in_one_statement_query())
_ANNOTATION_COLUMNS = tuple(c.name for c in _A.c if c.name != "id")
# The transactional way of a submit (the lease locked and checked first), on PostgreSQL: the
# count moves only while the prompt is below its overlap; the annotation and the lease's new
# status are written only when it did (no row back: nothing written, see submit()).
_counted = (
    update(_P)
    .where(
        _P.c.id == bindparam("v_prompt_id"),
        _P.c.annotation_count < bindparam("v_overlap"),
    )
    .values(annotation_count=_P.c.annotation_count + 1, open_leases=_P.c.open_leases - 1)
    .returning(_P.c.id)
    .cte("counted")
)


def _insert_and_close(counted: Any, values: Any) -> Any:
    """The end of a one-statement submit: the annotation inserted from ``values`` (a select of
    its columns, ``_ANNOTATION_COLUMNS``) and the lease marked submitted, both only when
    ``counted`` (the CTE that moved the prompt's count) returned its row. Back: the new
    annotation's id, or no row."""
    annotation = (
        insert(_A).from_select(_ANNOTATION_COLUMNS, values).returning(_A.c.id).cte("new_annotation")
    )
    submitted = (
        update(_L)
        .where(_L.c.id == bindparam("v_lease_id"), exists(select(counted.c.id)))
        .values(status=LeaseStatus.submitted, closed_at=bindparam("v_created_at"))
        .cte("lease_submitted")
    )
    return select(annotation.c.id).add_cte(submitted)


_RECORD_SUBMIT = _insert_and_close(
    _counted, select(*_typed(_A, _ANNOTATION_COLUMNS)).select_from(_counted)
)


def _validated_submit() -> Any:
    """PostgreSQL: a submit as one statement that needs nothing read before it. It locks the
    lease, and writes only if the lease is this user's, open and live **and** the annotation
    fits it: the ranking's ids are exactly the lease's shown ids (``v_shown``, distinct: the
    caller checked), and the project allows what the annotation uses (a tie, Likert scores,
    these flags, no rationale). Everything else about the annotation does not depend on the
    lease and the caller checked it first (:func:`_submit_in_one_statement`). The
    annotation's project, prompt and display order come from the locked lease; the count moves
    only while the prompt is below its project's overlap. Back: the annotation's id, or no row
    (nothing written: the caller takes the transactional way, which names the problem)."""
    display_order = _L.c.display_order
    lease = (
        select(_L.c.project_id, _L.c.prompt_id, display_order, _PR.c.overlap)
        .join(_PR, _PR.c.id == _L.c.project_id)
        .where(
            _L.c.id == bindparam("v_lease_id"),
            _L.c.user_id == bindparam("v_user_id"),
            _L.c.status == LeaseStatus.open,
            _L.c.expires_at > bindparam("v_created_at"),
            # the same set of ids (v_shown has no duplicates)
            display_order.op("@>")(_jsonb("v_shown")),
            func.jsonb_array_length(display_order) == bindparam("v_shown_count"),
            or_(_PR.c.allow_ties, ~_flag("v_tied")),
            or_(_PR.c.likert, ~_flag("v_scored")),
            func.coalesce(_PR.c.flags, literal_column("'[]'::jsonb")).op("@>")(
                _jsonb("v_flag_names")
            ),
            or_(~_PR.c.require_rationale, _flag("v_explained")),
        )
        .with_for_update(of=_L)
        .cte("valid_lease")
    )
    counted = (
        update(_P)
        .where(_P.c.id == lease.c.prompt_id, _P.c.annotation_count < lease.c.overlap)
        .values(annotation_count=_P.c.annotation_count + 1, open_leases=_P.c.open_leases - 1)
        .returning(_P.c.id)
        .cte("counted")
    )
    from_lease = {"project_id", "prompt_id", "display_order"}
    values = select(
        *(lease.c[n] if n in from_lease else _typed(_A, (n,))[0] for n in _ANNOTATION_COLUMNS)
    ).select_from(lease.join(counted, _TRUE))
    return _insert_and_close(counted, values)


_VALIDATED_SUBMIT = Precompiled(_validated_submit())


def _candidates(project: Any, user_id: int):
    """Prompts this user may be given now, best first (not locked): for progress pages."""
    return select(_P.c.id).where(
        _P.c.project_id == project.id,
        _P.c.annotation_count < project.overlap,
        _P.c.annotation_count + _P.c.open_leases < project.overlap,
        ~exists().where(_L.c.prompt_id == _P.c.id, _L.c.user_id == user_id),
        ~exists().where(_A.c.prompt_id == _P.c.id, _A.c.user_id == user_id),
        _READY,
    )


# --------------------------------------------------------------------------- next task


def next_task(
    session: Session,
    *,
    slug: str,
    user: User,
    exclude: Sequence[int] = (),
    max_open_leases: int | None = None,
) -> Task | None:
    """The user's task in project ``slug``: their oldest open lease not in ``exclude`` (so a
    reload shows the same task), else a new lease on the best candidate; None when nothing is
    left for them. A user already holding ``max_open_leases`` live leases (all projects) gets
    :class:`TooManyRequests` instead of a new one."""
    conn = session.connection()
    now = utcnow()
    exclude = list(exclude)[:MAX_EXCLUDE]
    if conn.dialect.name == "postgresql" and _fresh_enough():
        task = _next_in_one_statement(
            session, slug=slug, user=user, exclude=exclude, max_open_leases=max_open_leases, now=now
        )
        if task is not None:
            return task
        conn = session.connection()
    # One round trip for the project and the user's open lease in it (the common cases are
    # "no open lease" under load and "resume" on a page reload), and on PostgreSQL the head of
    # the queue.
    project = conn.execute(
        _PROJECT_FOR_TASK.get(conn.dialect.name, _PROJECT_AND_RESUME),
        {
            "slug": slug,
            "user_id": user.id,
            "now": now,
            "exclude": exclude,
        },
    ).first()
    if project is None:
        session.rollback()
        raise NotFound(f"project {slug!r} not found")
    if not _may_label(session, project=project, user=user):
        session.rollback()
        raise Forbidden(f"project {slug!r} is open to its members only")
    if project.resume_id is not None:
        lease = session.get(Lease, project.resume_id)
        assert lease is not None
        task = _task(session, lease=lease)
        session.rollback()  # end the read transaction
        return task
    if max_open_leases is not None and project.live_leases >= max_open_leases:
        _too_many_leases(session, user_id=user.id, now=now, held=project.live_leases)

    # json_agg of no rows is NULL: an empty queue
    head = _spread(project.head or []) if "head" in project._fields else None
    for _ in range(2):  # a second try only after losing a same-user race (unique violation)
        try:
            return _new_lease(session, project=project, user_id=user.id, head=head)
        except IntegrityError:
            session.rollback()
            head = None  # read the queue again
    raise Conflict("could not assign a task, retry")


def _next_in_one_statement(
    session: Session,
    *,
    slug: str,
    user: User,
    exclude: list[int],
    max_open_leases: int | None,
    now: datetime,
) -> Task | None:
    """PostgreSQL, the common case of :func:`next_task` (a new lease from the head of the
    queue) in one round trip (:data:`_NEXT_IN_ONE_STATEMENT`); None: nothing written, take the
    way of several statements."""
    params = _next_params(slug, user, exclude, max_open_leases, now)
    try:
        row = _NEXT_IN_ONE_STATEMENT.first(session.connection(), params)
    except IntegrityError:  # this user's concurrent request leased that prompt first
        session.rollback()
        return None
    session.commit()  # sends nothing in autocommit mode
    return None if row is None else _leased_task(row)


def _next_params(
    slug: str, user: User, exclude: Sequence[int], max_open_leases: int | None, now: datetime
) -> dict[str, Any]:
    return {
        "slug": slug,
        "user_id": user.id,
        "is_admin": user.role == Role.admin,
        "now": now,
        "exclude_ids": list(exclude)[:MAX_EXCLUDE],
        "max_open": max_open_leases if max_open_leases is not None else 2**31 - 1,
        # the lease's own values (the statement takes the rest from the project and the pick)
        "v_user_id": user.id,
        "v_status": LeaseStatus.open,
        "v_created_at": now,
    }


def _leased_task(row: Any) -> Task:
    """The task of a row of :data:`_NEXT_IN_ONE_STATEMENT`."""
    texts = dict(row.shown)
    shown = [(cid, texts[cid]) for cid in row.display_order]
    return _new_task(row.lease_id, row.expires_at, row.id, row.messages, shown)


def _fresh_enough() -> bool:
    """Whether this process reclaimed expired leases within :data:`RECLAIM_INTERVAL` (the
    one-statement ``next`` does not reclaim; the way of several statements does)."""
    return time.monotonic() - _last_reclaim < RECLAIM_INTERVAL


async def try_next_task(
    pool: StatementPool,
    *,
    slug: str,
    user: User,
    exclude: Sequence[int] = (),
    max_open_leases: int | None = None,
) -> Task | None:
    """PostgreSQL: :func:`next_task`'s common case — a new lease from the head of the queue —
    as one statement on a connection of ``pool`` (:func:`app.db.statement_pool`), awaited on
    the event loop with no worker thread. None: nothing was written (a lease to resume, the
    open-lease limit, an unknown or closed project, an empty queue head, a reclaim due, a race
    with the user's own request, no pooled connection soon); :func:`next_task` then
    answers."""
    if not _fresh_enough():
        return None
    params = _next_params(slug, user, exclude, max_open_leases, utcnow())
    try:
        row = await pool.first(_NEXT_IN_ONE_STATEMENT, params)
    except IntegrityError:  # this user's concurrent request leased that prompt first
        return None
    except PoolTimeout:  # no connection soon (app.db.STATEMENT_POOL_WAIT_S)
        return None
    return None if row is None else _leased_task(row)


def _too_many_leases(session: Session, *, user_id: int, now: datetime, held: int) -> None:
    first = session.connection().execute(_FIRST_EXPIRY, {"user_id": user_id, "now": now}).scalar()
    session.rollback()
    wait = max(1, int((first - now).total_seconds()) + 1) if first is not None else 1
    raise TooManyRequests(
        f"you already hold {held} open tasks (the most one user may hold); submit or skip one "
        "of them, or wait until one expires",
        retry_after=wait,
    )


def _new_lease(
    session: Session, *, project: Any, user_id: int, head: list[int] | None = None
) -> Task | None:
    """A new lease for ``user_id``; ``head``: the queue's head read with the project (None:
    read it here)."""
    now = utcnow()
    reclaimed = False
    if time.monotonic() - _last_reclaim >= RECLAIM_INTERVAL:
        if _reclaim(session, now=now):
            head = None  # slots came free: the head read before may miss them
        reclaimed = True
    if session.get_bind().dialect.name == "postgresql":
        return _new_lease_in_one_statement(
            session, project=project, user_id=user_id, head=head, now=now, reclaimed=reclaimed
        )
    write_transaction(session)
    conn = session.connection()
    row = _find_candidate(conn, project=project, user_id=user_id, head=head)
    if row is None and not reclaimed and _reclaim(session, now=now):  # slots came free
        write_transaction(session)
        conn = session.connection()
        row = _find_candidate(conn, project=project, user_id=user_id)
    if row is None:
        session.commit()
        return None
    prompt_id, messages = row
    shown = [
        tuple(c)
        for c in conn.execute(
            _FIRST_COMPLETIONS, {"prompt_id": prompt_id, "k": project.completions_per_task}
        )
    ]
    _rng.shuffle(shown)
    values = _lease_values(project, prompt_id, user_id, now)
    values["display_order"] = [cid for cid, _ in shown]
    lease_id = conn.execute(_INSERT_LEASE, values).scalar_one()
    conn.execute(_TAKE_SLOT, {"pid": prompt_id})
    session.commit()
    return _new_task(lease_id, values["expires_at"], prompt_id, messages, shown)


def _new_lease_in_one_statement(
    session: Session,
    *,
    project: Any,
    user_id: int,
    head: list[int] | None,
    now: datetime,
    reclaimed: bool,
) -> Task | None:
    """PostgreSQL: pick and lease in one statement (:func:`_pick_and_lease`), which needs no
    transaction around it: the labeling routes' sessions run it on its own
    (:func:`app.db.make_statement_session_factory`), one round trip per new lease."""
    conn = session.connection()
    values = _lease_values(project, None, user_id, now)
    params = {
        "in_project": project.id,
        "overlap": project.overlap,
        "user_id": user_id,
        "k": project.completions_per_task,
        **_prefixed(values),
    }
    row = _find_candidate(conn, project=project, user_id=user_id, head=head, params=params)
    if row is None and not reclaimed and _reclaim(session, now=now):
        conn = session.connection()
        row = _find_candidate(conn, project=project, user_id=user_id, params=params)
    session.commit()  # sends nothing in autocommit mode
    if row is None:
        return None
    texts = dict(row.shown)
    shown = [(cid, texts[cid]) for cid in row.display_order]
    return _new_task(row.lease_id, values["expires_at"], row.id, row.messages, shown)


def _lease_values(project: Any, prompt_id: int | None, user_id: int, now: datetime) -> dict:
    return {
        "project_id": project.id,
        "prompt_id": prompt_id,
        "user_id": user_id,
        "status": LeaseStatus.open,
        "display_order": None,
        "created_at": now,
        "expires_at": now + timedelta(seconds=project.lease_seconds),
        "closed_at": None,
    }


def _new_task(
    lease_id: int, expires_at: datetime, prompt_id: int, messages: Any, shown: Sequence[tuple]
) -> Task:
    return Task(
        lease_id=lease_id,
        expires_at=expires_at,
        prompt=TaskPrompt(id=prompt_id, messages=messages),
        completions=[
            TaskCompletion(id=cid, label=LABELS[i], text=text)
            for i, (cid, text) in enumerate(shown)
        ],
    )


def _reclaim(session: Session, *, now: datetime) -> int:
    """Reclaim expired leases in a transaction of their own; how many."""
    global _last_reclaim
    _last_reclaim = time.monotonic()
    write_transaction(session)
    n = reclaim_expired(session, now=now)
    session.commit()
    return n


def _find_candidate(
    conn: Any,
    *,
    project: Any,
    user_id: int,
    head: list[int] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """The best candidate for ``user_id``, locked (SQLite: a row of its id and messages); on
    PostgreSQL, with ``params`` holding the new lease's values, already leased (a row of
    :func:`_pick_and_lease`)."""
    leasing = params is not None
    params = params or {
        "in_project": project.id,
        "overlap": project.overlap,
        "user_id": user_id,
        "k": project.completions_per_task,
    }
    if head is None:
        head = _spread(conn.execute(_QUEUE_HEAD, params).all())
    if head:
        in_head = _PICK_AND_LEASE["head"] if leasing else _IN_HEAD["sqlite"]
        row = conn.execute(in_head, {**params, "head": head}).first()
        if row is not None:
            return row
    if len(head) < QUEUE_HEAD_WINDOW:
        return None  # the head was the whole queue
    fresh, anywhere = (
        (_PICK_AND_LEASE["fresh"], _PICK_AND_LEASE["anywhere"]) if leasing else (_FRESH, _ANYWHERE)
    )
    return conn.execute(fresh, params).first() or conn.execute(anywhere, params).first()


def _spread(rows: Sequence[Any]) -> list[int]:
    """The head's prompt ids, most annotated first, in random order among equals: concurrent
    requests then try different rows first instead of all queueing behind (or skipping past)
    the same one or two, which every request would otherwise evaluate and find locked."""
    out: list[int] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][1] != rows[start][1]:
            run = [r[0] for r in rows[start:i]]
            _spread_rng.shuffle(run)
            out += run
            start = i
    return out


def _task(session: Session, *, lease: Lease) -> Task:
    messages = session.scalar(select(Prompt.messages).where(Prompt.id == lease.prompt_id))
    texts = dict(
        session.execute(
            select(Completion.id, Completion.text).where(Completion.id.in_(lease.display_order))
        ).all()
    )
    return Task(
        lease_id=lease.id,
        expires_at=lease.expires_at,
        prompt=TaskPrompt(id=lease.prompt_id, messages=messages or []),
        completions=[
            TaskCompletion(id=cid, label=LABELS[i], text=texts.get(cid, ""))
            for i, cid in enumerate(lease.display_order)
        ],
    )


def reclaim_expired(session: Session, *, now: datetime | None = None) -> int:
    """Close up to RECLAIM_BATCH open leases past their expiry and give their slots back.

    Runs inside the caller's write transaction (no commit). Leases locked by a concurrent
    request are skipped (that request is closing them)."""
    now = now or utcnow()
    query = (
        select(Lease.id, Lease.prompt_id)
        .where(Lease.status == LeaseStatus.open, Lease.expires_at <= now)
        .order_by(Lease.expires_at)
        .limit(RECLAIM_BATCH)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(query).all()
    if not rows:
        return 0
    session.execute(
        update(Lease)
        .where(Lease.id.in_([r.id for r in rows]))
        .values(status=LeaseStatus.expired, closed_at=now)
    )
    per_prompt: dict[int, int] = defaultdict(int)
    for r in rows:
        per_prompt[r.prompt_id] += 1
    conn = session.connection()
    for prompt_id in sorted(per_prompt):  # id order: concurrent reclaimers cannot deadlock
        conn.execute(_GIVE_SLOT_BACK, {"pid": prompt_id, "n": per_prompt[prompt_id]})
    return len(rows)


# --------------------------------------------------------------------------- lease actions


def _locked_lease(session: Session, *, lease_id: int, user: User) -> Any:
    """The lease row with its project's settings, locked; 404 or 403 (after a rollback)."""
    lease = session.connection().execute(_LOCK_LEASE, {"lease_id": lease_id}).first()
    if lease is None:
        session.rollback()
        raise NotFound(f"lease {lease_id} not found")
    if lease.user_id != user.id:
        session.rollback()
        raise Forbidden(f"lease {lease_id} belongs to another annotator")
    return lease


def _close(session: Session, lease: Any, status: LeaseStatus, now: datetime) -> None:
    session.connection().execute(
        _CLOSE_LEASE, {"lid": lease.id, "new_status": status, "closed": now}
    )


def _close_if_expired(session: Session, lease: Any, now: datetime) -> None:
    """Raise 409 for a lease that is not open, expiring it first when its time is up."""
    if lease.status == LeaseStatus.open and lease.expires_at <= now:
        _close(session, lease, LeaseStatus.expired, now)
        session.connection().execute(_GIVE_SLOT_BACK, {"pid": lease.prompt_id, "n": 1})
        session.commit()
        raise Conflict(f"lease {lease.id} expired at {lease.expires_at.isoformat()}")
    if lease.status != LeaseStatus.open:
        session.rollback()
        raise Conflict(f"lease {lease.id} is already {lease.status.value}")


def _annotation_values(lease: Any, user: User, now: datetime, **fields: Any) -> dict[str, Any]:
    values = {
        "project_id": lease.project_id,
        "prompt_id": lease.prompt_id,
        "user_id": user.id,
        "lease_id": lease.id,
        "revision": 1,
        "supersedes_id": None,
        "ranking": [],
        "likert": {},
        "flags": {},
        "rationale": "",
        "display_order": list(lease.display_order),
        "duration_ms": None,
        "skip_reason": None,
        "strength": None,
        "both_bad": False,
        "created_at": now,
    }
    values.update(fields)
    return values


def submit(session: Session, *, lease_id: int, user: User, data: SubmitAnnotation) -> Recorded:
    """Record the annotation of an open lease. A retry of an already-recorded submit with the
    same content returns the first annotation (``replayed``); different content is a 409.

    On PostgreSQL the common case (an open, live lease and a valid annotation) is one
    statement with no transaction around it, which checks the lease and the annotation under
    the lease's row lock and writes everything (:func:`_submit_in_one_statement`). Everything
    else (an invalid annotation, a retry, an expired lease, a race with a reclaim) goes the
    transactional way below, which names the problem and also serves SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        recorded = _submit_in_one_statement(session, lease_id=lease_id, user=user, data=data)
        if recorded is not None:
            return recorded
    write_transaction(session)
    now = utcnow()
    lease = _locked_lease(session, lease_id=lease_id, user=user)
    if lease.status == LeaseStatus.submitted:
        earlier = session.scalar(select(Annotation).where(Annotation.lease_id == lease.id))
        session.rollback()
        if earlier is not None and _same_submission(earlier, data):
            return Recorded(earlier.id, lease.id, replayed=True)
        raise Conflict(f"lease {lease.id} was already submitted with different content")
    _close_if_expired(session, lease, now)
    errors = validate_submission(data, shown=lease.display_order, project=lease)
    if errors:
        session.rollback()
        raise InvalidInput("annotation rejected; nothing was written", errors=errors)

    conn = session.connection()
    values = _submitted_values(lease, user, now, data)
    annotation_id: int | None = None
    if conn.dialect.name == "postgresql":  # count, insert and close in one statement
        annotation_id = conn.execute(_RECORD_SUBMIT, _prefixed(values)).scalar()
    else:
        counted = conn.execute(
            _COUNT_ANNOTATION, {"pid": lease.prompt_id, "overlap": lease.overlap}
        )
        if counted.rowcount == 1:
            annotation_id = conn.execute(_INSERT_ANNOTATION, values).scalar_one()
            _close(session, lease, LeaseStatus.submitted, now)
    if annotation_id is None:  # the overlap was lowered below what this prompt already has
        _close(session, lease, LeaseStatus.expired, now)
        conn.execute(_GIVE_SLOT_BACK, {"pid": lease.prompt_id, "n": 1})
        session.commit()
        raise Conflict("this prompt already has all the annotations it needs")
    session.commit()
    return Recorded(annotation_id, lease.id)


def _submitted_values(lease: Any, user: User, now: datetime, data: SubmitAnnotation) -> dict:
    """The new annotation's columns (plus ``overlap``, for the count's guard)."""
    return {
        **_annotation_values(
            lease,
            user,
            now,
            status=AnnotationStatus.submitted,
            ranking=[list(group) for group in data.ranking],
            likert={str(int(k)): v for k, v in data.likert.items()},
            flags={str(int(k)): list(v) for k, v in data.flags.items() if v},
            rationale=data.rationale.strip(),
            duration_ms=data.duration_ms,
            strength=data.strength,
            both_bad=data.both_bad,
        ),
        "overlap": lease.overlap,
    }


@dataclass(frozen=True, slots=True)
class _UnreadLease:
    """A lease known by id only: :data:`_VALIDATED_SUBMIT` takes the rest from the row."""

    id: int
    project_id: None = None
    prompt_id: None = None
    display_order: tuple = ()
    overlap: None = None


@dataclass(frozen=True, slots=True)
class _AnySettings:
    """Project settings that allow everything an annotation can use: what
    :func:`_submit_in_one_statement` checks first, leaving the project's own to the statement."""

    flags: Sequence[str]
    allow_ties: bool = True
    likert: bool = True
    require_rationale: bool = False


def _submit_in_one_statement(
    session: Session, *, lease_id: int, user: User, data: SubmitAnnotation
) -> Recorded | None:
    """PostgreSQL's common case of :func:`submit` in one statement (:data:`_VALIDATED_SUBMIT`),
    with no read before it and no transaction around it. The annotation is checked twice: here
    as if the lease had shown exactly the ranked ids and the project allowed everything, then
    in the statement against the locked lease and its project. None (nothing written): a
    problem either way, or a lease not this user's, not open or not live; the transactional
    way then answers with the problem itself (or the replay of a retry)."""
    params = _submit_params(lease_id, user, data)
    if params is None:
        return None
    row = _VALIDATED_SUBMIT.first(session.connection(), params)
    session.commit()  # sends nothing in autocommit mode
    return None if row is None else Recorded(row.id, lease_id)


def _submit_params(lease_id: int, user: User, data: SubmitAnnotation) -> dict[str, Any] | None:
    """:data:`_VALIDATED_SUBMIT`'s parameters, or None when the annotation has a problem that
    does not depend on the lease (see :func:`_submit_in_one_statement`)."""
    shown = [cid for group in data.ranking for cid in group]
    flag_names = sorted({f for flags in data.flags.values() for f in flags})
    if validate_submission(data, shown=shown, project=_AnySettings(flags=flag_names)):
        return None
    values = _submitted_values(_UnreadLease(lease_id), user, utcnow(), data)
    return {
        **_prefixed(values),
        "v_shown": shown,
        "v_shown_count": len(shown),
        "v_tied": any(len(group) > 1 for group in data.ranking) and not data.both_bad,
        "v_scored": bool(data.likert),
        "v_flag_names": flag_names,
        "v_explained": bool(data.rationale.strip()),
    }


async def try_submit(
    pool: StatementPool, *, lease_id: int, user: User, data: SubmitAnnotation
) -> Recorded | None:
    """PostgreSQL: :func:`submit`'s common case as one statement on a connection of ``pool``
    (:func:`app.db.statement_pool`), awaited on the event loop with no worker thread. None:
    nothing was written (see :func:`_submit_in_one_statement`); :func:`submit` then answers,
    naming the problem or replaying a retry."""
    params = _submit_params(lease_id, user, data)
    if params is None:
        return None
    try:
        row = await pool.first(_VALIDATED_SUBMIT, params)
    except PoolTimeout:  # no connection soon (app.db.STATEMENT_POOL_WAIT_S)
        return None
    return None if row is None else Recorded(row.id, lease_id)


def _same_submission(earlier: Annotation, data: SubmitAnnotation) -> bool:
    return (
        earlier.ranking == [list(g) for g in data.ranking]
        and earlier.likert == {str(int(k)): v for k, v in data.likert.items()}
        and earlier.flags == {str(int(k)): list(v) for k, v in data.flags.items() if v}
        and earlier.rationale == data.rationale.strip()
        and earlier.strength == data.strength
        and earlier.both_bad == data.both_bad
    )


def skip(
    session: Session, *, lease_id: int, user: User, reason: str, duration_ms: int | None = None
) -> Recorded:
    """Give the task up: recorded as a skipped annotation (the prompt is never offered to this
    annotator again) and the slot goes back to the others."""
    write_transaction(session)
    now = utcnow()
    lease = _locked_lease(session, lease_id=lease_id, user=user)
    if lease.status == LeaseStatus.skipped:
        earlier = session.scalar(select(Annotation.id).where(Annotation.lease_id == lease.id))
        session.rollback()
        if earlier is not None:
            return Recorded(earlier, lease.id, replayed=True)
    _close_if_expired(session, lease, now)
    conn = session.connection()
    annotation_id = conn.execute(
        _INSERT_ANNOTATION,
        _annotation_values(
            lease,
            user,
            now,
            status=AnnotationStatus.skipped,
            skip_reason=reason.strip(),
            duration_ms=duration_ms,
        ),
    ).scalar_one()
    _close(session, lease, LeaseStatus.skipped, now)
    conn.execute(_GIVE_SLOT_BACK, {"pid": lease.prompt_id, "n": 1})
    session.commit()
    return Recorded(annotation_id, lease.id)


def extend(session: Session, *, lease_id: int, user: User) -> LeaseRead:
    """Heartbeat: the lease lives another ``lease_seconds`` from now."""
    write_transaction(session)
    now = utcnow()
    lease = _locked_lease(session, lease_id=lease_id, user=user)
    _close_if_expired(session, lease, now)
    expires_at = now + timedelta(seconds=lease.lease_seconds)
    session.execute(update(Lease).where(Lease.id == lease.id).values(expires_at=expires_at))
    session.commit()
    return LeaseRead(lease_id=lease.id, expires_at=expires_at)


# --------------------------------------------------------------------------- validation


def validate_submission(
    data: SubmitAnnotation, *, shown: Sequence[int], project: Any
) -> list[dict[str, Any]]:
    """Every problem of ``data`` for a task that showed ``shown``; empty when it is valid.
    ``project`` needs ``allow_ties``, ``likert``, ``flags`` and ``require_rationale``."""
    errors: list[dict[str, Any]] = []

    def err(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    task_ids = set(shown)
    seen: set[int] = set()
    for i, group in enumerate(data.ranking):
        if not group:
            err(f"ranking.{i}", "empty group")
        for cid in group:
            if cid not in task_ids:
                err(f"ranking.{i}", f"completion {cid} is not part of this task")
            elif cid in seen:
                err(f"ranking.{i}", f"completion {cid} is ranked more than once")
            seen.add(cid)
    missing = [cid for cid in shown if cid not in seen]
    if missing:
        err("ranking", "every completion must be ranked; missing: " + _ids(missing))
    tied = any(len(g) > 1 for g in data.ranking)
    pairwise = len(shown) == 2
    if data.both_bad:
        if not pairwise:
            err("both_bad", "only for pairwise tasks (2 completions)")
        elif len(data.ranking) != 1:
            err("both_bad", "'both bad' is recorded as a tie: rank both in one group")
    elif tied and not project.allow_ties:
        err("ranking", "ties are not allowed in this project")
    if data.strength is not None:
        if not pairwise:
            err("strength", "only for pairwise tasks (2 completions)")
        elif tied:
            err("strength", "a tie has no strength")

    if data.likert and not project.likert:
        err("likert", "this project does not collect Likert scores")
    else:
        for key in data.likert:
            if _completion_key(key) not in task_ids:
                err(f"likert.{key}", "not a completion of this task")

    allowed = set(project.flags or [])
    for key, flags in data.flags.items():
        if _completion_key(key) not in task_ids:
            err(f"flags.{key}", "not a completion of this task")
            continue
        unknown = [f for f in flags if f not in allowed]
        if unknown:
            err(f"flags.{key}", "not one of the project's flags: " + ", ".join(map(repr, unknown)))
        if len(set(flags)) != len(flags):
            err(f"flags.{key}", "a flag is given twice")

    if project.require_rationale and not data.rationale.strip():
        err("rationale", "this project requires a rationale")
    return errors


def _completion_key(key: str) -> int | None:
    return int(key) if key.isascii() and key.isdigit() and len(key) <= 19 else None


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in ids)


# --------------------------------------------------------------------------- progress


def _progress_counts(session: Session, project_ids: list[int], user_id: int) -> dict[int, tuple]:
    if not project_ids:
        return {}
    rows = session.execute(
        select(
            Prompt.project_id,
            func.count(),
            func.sum(case((Prompt.annotation_count >= Project.overlap, 1), else_=0)),
        )
        .join(Project, Project.id == Prompt.project_id)
        .where(Prompt.project_id.in_(project_ids))
        .group_by(Prompt.project_id)
    ).all()
    mine = dict(
        session.execute(
            select(Annotation.project_id, func.count())
            .where(
                Annotation.user_id == user_id,
                Annotation.revision == 1,
                Annotation.project_id.in_(project_ids),
            )
            .group_by(Annotation.project_id)
        ).all()
    )
    out = {pid: (0, 0, mine.get(pid, 0)) for pid in project_ids}
    for pid, total, complete in rows:
        out[pid] = (total, int(complete or 0), mine.get(pid, 0))
    return out


def _has_task_for(session: Session, project: Project, user_id: int) -> bool:
    if session.scalar(
        select(Lease.id)
        .where(
            Lease.user_id == user_id,
            Lease.project_id == project.id,
            Lease.status == LeaseStatus.open,
            Lease.expires_at > utcnow(),
        )
        .limit(1)
    ):
        return True
    return session.execute(_candidates(project, user_id).limit(1)).first() is not None


def annotator_home(session: Session, *, user: User) -> list[ProjectProgress]:
    """The projects this user may label, with their progress."""
    projects = _visible_projects(session, user=user)
    counts = _progress_counts(session, [p.id for p in projects], user.id)
    return [
        ProjectProgress(
            slug=p.slug,
            name=p.name,
            prompt_count=counts[p.id][0],
            complete_count=counts[p.id][1],
            my_count=counts[p.id][2],
            available=_has_task_for(session, p, user.id),
        )
        for p in projects
    ]


def labeling_context(session: Session, *, slug: str, user: User) -> LabelContext:
    """The project settings and progress the labeling page shows around the task."""
    project = session.get(Project, _labelable_project(session, slug=slug, user=user).id)
    assert project is not None
    total, complete, mine = _progress_counts(session, [project.id], user.id)[project.id]
    return LabelContext(
        slug=project.slug,
        name=project.name,
        guidelines=project.guidelines,
        completions_per_task=project.completions_per_task,
        allow_ties=project.allow_ties,
        likert=project.likert,
        flags=list(project.flags or []),
        require_rationale=project.require_rationale,
        lease_seconds=project.lease_seconds,
        prompt_count=total,
        complete_count=complete,
        my_count=mine,
        pending_generation=pending_generation(session, project_id=project.id),
    )


def check_invariants(session: Session, *, project_id: int | None = None) -> list[str]:
    """Every violated invariant, as text (empty when all hold). For tests and benchmarks."""
    problems: list[str] = []
    now = utcnow()
    prompts = select(Prompt.id, Prompt.annotation_count, Prompt.open_leases, Project.overlap).join(
        Project, Project.id == Prompt.project_id
    )
    if project_id is not None:
        prompts = prompts.where(Prompt.project_id == project_id)
    submitted = dict(
        session.execute(
            select(Annotation.prompt_id, func.count())
            .where(Annotation.status == AnnotationStatus.submitted, Annotation.revision == 1)
            .group_by(Annotation.prompt_id)
        ).all()
    )
    open_ = dict(
        session.execute(
            select(Lease.prompt_id, func.count())
            .where(Lease.status == LeaseStatus.open)
            .group_by(Lease.prompt_id)
        ).all()
    )
    live = dict(
        session.execute(
            select(Lease.prompt_id, func.count())
            .where(Lease.status == LeaseStatus.open, Lease.expires_at > now)
            .group_by(Lease.prompt_id)
        ).all()
    )
    for pid, count, open_leases, overlap in session.execute(prompts):
        real = submitted.get(pid, 0)
        if real > overlap:
            problems.append(f"prompt {pid}: {real} submitted annotations > overlap {overlap}")
        if real + live.get(pid, 0) > overlap:
            problems.append(f"prompt {pid}: submitted + live leases > overlap {overlap}")
        if count != real:
            problems.append(f"prompt {pid}: annotation_count {count} != {real} submitted")
        if open_leases != open_.get(pid, 0):
            problems.append(f"prompt {pid}: open_leases {open_leases} != {open_.get(pid, 0)}")
    twice = session.execute(
        select(Annotation.prompt_id, Annotation.user_id)
        .where(Annotation.revision == 1)
        .group_by(Annotation.prompt_id, Annotation.user_id)
        .having(func.count() > 1)
    ).all()
    problems += [f"prompt {p}: user {u} annotated it twice" for p, u in twice]
    mismatched = session.execute(
        select(Annotation.id)
        .join(Lease, Lease.id == Annotation.lease_id)
        .where(
            or_(
                Lease.user_id != Annotation.user_id,
                Lease.prompt_id != Annotation.prompt_id,
                and_(
                    Annotation.status == AnnotationStatus.submitted,
                    Lease.status != LeaseStatus.submitted,
                ),
            )
        )
    ).all()
    problems += [f"annotation {a}: does not match its lease" for (a,) in mismatched]
    return problems
