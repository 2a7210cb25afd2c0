"""Labeling API: next task, submit / skip / extend a lease (any active user), project
members (admin).

The labeling routes are the hot path (two requests per annotation) and are built to cost the
event loop little:

- they authenticate inside the endpoint (``caller.user(session)``) rather than through the
  ``CurrentUser`` dependency: the same checks, in the endpoint's thread, so each request takes
  one thread hop and one pooled connection;
- their one dependency, :func:`app.deps.caller`, reads the credentials from the headers, and
  the session is opened and closed in the endpoint (:func:`app.deps.request_session`): FastAPI
  resolves every dependency again on each request (an async-generator one through an exit
  stack), 20 % of the event loop's samples under load before this;
- they return a ready :class:`JSONBody` (the schema serialised by pydantic): a sync
  endpoint's return value would otherwise be validated against ``response_model`` in a second
  thread hop (13 % of the server's samples). ``response_model`` still documents the answer,
  and ``CALLER_SECURITY`` the two ways to authenticate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from pydantic import Field

from app.deps import (
    CALLER_SECURITY,
    AdminUser,
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
def next_task(
    slug: str,
    request: Request,
    caller: CallerDep,
    exclude: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]],
        Query(max_length=20, description="Lease ids not to resume (e.g. the one on screen)."),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
) -> Response:
    with request_session(request) as session:
        task = tasks.next_task(
            session,
            slug=slug,
            user=caller.user(session),
            exclude=exclude,
            max_open_leases=request.app.state.settings.max_open_leases,
        )
    if task is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return JSONBody(task)


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
def submit(
    lease_id: LeaseId,
    data: SubmitAnnotation,
    request: Request,
    caller: CallerDep,
) -> Response:
    with request_session(request) as session:
        user = caller.user(session)
        return _recorded(tasks.submit(session, lease_id=lease_id, user=user, data=data))


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
