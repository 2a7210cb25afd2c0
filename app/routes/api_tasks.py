"""Labeling API: next task, submit / skip / extend a lease (any active user), project
members (admin).

The labeling routes are the hot path (two requests per annotation) and are built to cost the
event loop little:

- ``next`` and ``submit`` are ``async``: on PostgreSQL, a bearer token this process checked
  recently (:meth:`app.deps.Caller.cached_user`) gets the common case — a new lease from the
  head of the queue, an annotation that fits its lease — as one statement awaited on the event
  loop (:func:`app.services.tasks.try_next_task`, :func:`~app.services.tasks.try_submit`,
  on :func:`app.db.statement_pool`): no worker thread, whose hand-off cost more than the
  statement's own client work. Everything else (no row back: nothing was written) goes to the
  full services in a worker thread, which answer as always: resume, refusals that name their
  reason, a retried submit's replay, browser sessions, a token not checked lately;
- the full services authenticate inside the endpoint's thread (``caller.user(session)``)
  rather than through the ``CurrentUser`` dependency: the same checks, one thread hop and one
  pooled connection per request;
- their one dependency, :func:`app.deps.caller`, reads the credentials from the headers, and
  the session is opened and closed in the worker thread (:func:`app.deps.request_session`):
  FastAPI resolves every dependency again on each request (an async-generator one through an
  exit stack), 20 % of the event loop's samples under load before this;
- they return a ready :class:`JSONBody` (the schema serialised by pydantic): a return value
  would otherwise be validated against ``response_model`` again (13 % of the server's
  samples). ``response_model`` still documents the answer, and ``CALLER_SECURITY`` the two
  ways to authenticate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from app.deps import (
    CALLER_SECURITY,
    AdminUser,
    Caller,
    CallerDep,
    PageLimit,
    PageOffset,
    SessionDep,
    request_session,
)
from app.routes._responses import AUTHENTICATED, JSONBody, errors
from app.schemas import (
    MAX_ID,
    AnnotationCreated,
    LeaseRead,
    Members,
    SkipTask,
    SubmitAnnotation,
    Task,
)
from app.services import members, tasks

router = APIRouter(prefix="/api/v1", tags=["labeling"], responses=AUTHENTICATED)

LeaseId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get(
    "/projects/{slug}/tasks/next",
    response_model=Task,
    responses={
        204: {"description": "Nothing left for this annotator."},
        **errors(404, 409, 422, 429),
    },
    openapi_extra=CALLER_SECURITY,
)
async def next_task(
    slug: str,
    request: Request,
    caller: CallerDep,
    exclude: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]],
        Query(max_length=20, description="Lease ids not to resume (e.g. the one on screen)."),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
) -> Response:
    max_open = request.app.state.settings.max_open_leases
    pool = request.app.state.statement_pool
    if pool is not None and (user := caller.cached_user()) is not None:
        task = await tasks.try_next_task(
            pool, slug=slug, user=user, exclude=exclude, max_open_leases=max_open
        )
        if task is not None:
            return JSONBody(task)
    task = await run_in_threadpool(_next_task, request, caller, slug, exclude, max_open)
    if task is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return JSONBody(task)


def _next_task(
    request: Request, caller: Caller, slug: str, exclude: list[int], max_open: int
) -> Task | None:
    with request_session(request) as session:
        return tasks.next_task(
            session,
            slug=slug,
            user=caller.user(session),
            exclude=exclude,
            max_open_leases=max_open,
        )


def _recorded(result: tasks.Recorded) -> Response:
    created = AnnotationCreated(annotation_id=result.annotation_id, lease_id=result.lease_id)
    headers = {"Idempotent-Replayed": "true"} if result.replayed else None
    return JSONBody(created, status_code=status.HTTP_201_CREATED, headers=headers)


@router.post(
    "/leases/{lease_id}/submit",
    status_code=status.HTTP_201_CREATED,
    response_model=AnnotationCreated,
    responses=errors(400, 404, 409, 413, 422),
    openapi_extra=CALLER_SECURITY,
)
async def submit(
    lease_id: LeaseId,
    data: SubmitAnnotation,
    request: Request,
    caller: CallerDep,
) -> Response:
    pool = request.app.state.statement_pool
    if pool is not None and (user := caller.cached_user()) is not None:
        recorded = await tasks.try_submit(pool, lease_id=lease_id, user=user, data=data)
        if recorded is not None:
            return _recorded(recorded)
    return _recorded(await run_in_threadpool(_submit, request, caller, lease_id, data))


def _submit(
    request: Request, caller: Caller, lease_id: int, data: SubmitAnnotation
) -> tasks.Recorded:
    with request_session(request) as session:
        return tasks.submit(session, lease_id=lease_id, user=caller.user(session), data=data)


@router.post(
    "/leases/{lease_id}/skip",
    status_code=status.HTTP_201_CREATED,
    response_model=AnnotationCreated,
    responses=errors(400, 404, 409, 413, 422),
    openapi_extra=CALLER_SECURITY,
)
def skip(
    lease_id: LeaseId,
    data: SkipTask,
    request: Request,
    caller: CallerDep,
) -> Response:
    with request_session(request) as session:
        user = caller.user(session)
        result = tasks.skip(
            session, lease_id=lease_id, user=user, reason=data.reason, duration_ms=data.duration_ms
        )
    return _recorded(result)


@router.post(
    "/leases/{lease_id}/extend",
    response_model=LeaseRead,
    responses=errors(404, 409, 422),
    openapi_extra=CALLER_SECURITY,
)
def extend(lease_id: LeaseId, request: Request, caller: CallerDep) -> Response:
    with request_session(request) as session:
        return JSONBody(tasks.extend(session, lease_id=lease_id, user=caller.user(session)))


@router.get(
    "/projects/{slug}/members",
    response_model=list[str],
    tags=["projects"],
    responses=errors(404, 422),
)
def list_members(
    slug: str, session: SessionDep, _: AdminUser, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[str]:
    return members.list_members(session, slug=slug, limit=limit, offset=offset)


@router.post(
    "/projects/{slug}/members",
    response_model=list[str],
    tags=["projects"],
    responses=errors(400, 404, 409, 413, 422),
)
def add_members(slug: str, data: Members, session: SessionDep, admin: AdminUser) -> list[str]:
    return members.add_members(session, slug=slug, usernames=data.usernames, actor=admin)


@router.delete(
    "/projects/{slug}/members",
    response_model=list[str],
    tags=["projects"],
    responses=errors(400, 404, 409, 413, 422),
)
def remove_members(slug: str, data: Members, session: SessionDep, admin: AdminUser) -> list[str]:
    return members.remove_members(session, slug=slug, usernames=data.usernames, actor=admin)
