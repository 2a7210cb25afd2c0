"""Labeling API: next task, submit / skip / extend a lease (any active user), project
members (admin).

The labeling routes authenticate inside the endpoint (``caller.user(session)``) rather than
through the ``CurrentUser`` dependency: the same checks, in the endpoint's thread, so these
high-traffic requests take one thread hop and one pooled connection each. For the same reason
they return a ready :class:`JSONBody` (the schema serialised by pydantic): a sync endpoint's
return value would otherwise be validated against ``response_model`` in a second thread hop
(FastAPI runs that validation in the thread pool): 13 % of the server's samples under load.
``response_model`` still documents the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import Field

from app.deps import AdminUser, CallerDep, PageLimit, PageOffset, SessionDep, SettingsDep
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
)
def next_task(
    slug: str,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    exclude: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]],
        Query(max_length=20, description="Lease ids not to resume (e.g. the one on screen)."),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
) -> Response:
    user = caller.user(session)
    task = tasks.next_task(
        session,
        slug=slug,
        user=user,
        exclude=exclude,
        max_open_leases=settings.max_open_leases,
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
)
def submit(
    lease_id: LeaseId,
    data: SubmitAnnotation,
    session: SessionDep,
    caller: CallerDep,
) -> Response:
    user = caller.user(session)
    return _recorded(tasks.submit(session, lease_id=lease_id, user=user, data=data))


@router.post(
    "/leases/{lease_id}/skip",
    status_code=status.HTTP_201_CREATED,
    response_model=AnnotationCreated,
    responses=errors(400, 404, 409, 413, 422),
)
def skip(
    lease_id: LeaseId,
    data: SkipTask,
    session: SessionDep,
    caller: CallerDep,
) -> Response:
    user = caller.user(session)
    result = tasks.skip(
        session, lease_id=lease_id, user=user, reason=data.reason, duration_ms=data.duration_ms
    )
    return _recorded(result)


@router.post("/leases/{lease_id}/extend", response_model=LeaseRead, responses=errors(404, 409, 422))
def extend(lease_id: LeaseId, session: SessionDep, caller: CallerDep) -> Response:
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
