"""The admin pages for accounts: ``/admin/users`` (every user, create, deactivate/reactivate)
and ``/admin/users/{username}`` (the user's API tokens: create, shown once, and revoke).

Same services as ``api_users``; every form is CSRF-checked. Deactivating ends the user's
browser sessions at once and makes their tokens stop working (while inactive).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.deps import OptionalWebUser, SessionDep
from app.errors import Conflict, DomainError
from app.models import Role
from app.routes._admin import (
    admin_gate,
    csrf_ok,
    error_page,
    field_errors,
    read_form,
    redirect_with_flash,
    render_admin,
    text_field,
)
from app.routes._web import csrf_failed, gettext_for
from app.schemas import MAX_ID, TokenCreate, UserCreate
from app.services import users
from app.services.auth_sessions import WebLogin

router = APIRouter(include_in_schema=False)

TokenId = Annotated[int, Path(ge=1, le=MAX_ID)]


def _users_page(
    request: Request,
    login: WebLogin,
    session: Any,
    *,
    status_code: int = 200,
    values: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> HTMLResponse:
    return render_admin(
        request,
        "admin/users.html",
        login=login,
        status_code=status_code,
        summaries=users.list_user_summaries(session),
        values=values or {"username": "", "role": Role.annotator.value},
        errors=errors or {},
        roles=[r.value for r in Role],
    )


def _user_page(
    request: Request,
    login: WebLogin,
    session: Any,
    *,
    username: str,
    status_code: int = 200,
    secret: str | None = None,
    new_token_id: int | None = None,
    token_name: str = "",
    errors: dict[str, list[str]] | None = None,
) -> HTMLResponse:
    try:
        user, tokens = users.user_with_tokens(session, username=username)
    except DomainError as exc:
        return error_page(request, login, exc)
    return render_admin(
        request,
        "admin/user.html",
        login=login,
        status_code=status_code,
        account=user,
        tokens=tokens,
        secret=secret,
        new_token_id=new_token_id,
        token_name=token_name,
        errors=errors or {},
    )


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(request: Request, session: SessionDep, web: OptionalWebUser) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    return _users_page(request, gate, session)


@router.post("/admin/users")
async def create_user(request: Request, session: SessionDep, web: OptionalWebUser) -> Response:
    gate = admin_gate(request, web, login_next="/admin/users")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    values = {"username": text_field(form, "username").strip(), "role": text_field(form, "role")}
    password = text_field(form, "password")
    try:
        data = UserCreate(
            username=values["username"], role=values["role"], password=password or None
        )
    except ValidationError as exc:
        errors = field_errors(request, exc)
        return await run_in_threadpool(
            lambda: _users_page(
                request, gate, session, status_code=422, values=values, errors=errors
            )
        )
    try:
        user = await run_in_threadpool(
            users.create_user,
            session,
            username=data.username,
            role=data.role,
            password=data.password,
            actor=gate.user,
        )
    except Conflict:
        _ = gettext_for(request)
        errors = {"username": [_("A user with this name already exists.")]}
        return await run_in_threadpool(
            lambda: _users_page(
                request, gate, session, status_code=409, values=values, errors=errors
            )
        )
    return redirect_with_flash(
        request, f"/admin/users#user-{user.username}", "user-created", username=user.username
    )


@router.post("/admin/users/{username}/active")
async def set_active(
    username: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    """Deactivate (``active=0``) or reactivate (``active=1``); back to the list, or to the
    user's page when the form says ``back=user``."""
    gate = admin_gate(request, web, login_next="/admin/users")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    active = text_field(form, "active") == "1"
    try:
        user = await run_in_threadpool(
            users.set_user_active,
            session,
            username=username,
            active=active,
            actor=gate.user,
        )
    except DomainError as exc:
        return error_page(request, gate, exc)
    back = (
        f"/admin/users/{user.username}"
        if text_field(form, "back") == "user"
        else f"/admin/users#user-{user.username}"
    )
    key = "user-reactivated" if active else "user-deactivated"
    return redirect_with_flash(request, back, key, username=user.username)


@router.get("/admin/users/{username}", response_class=HTMLResponse)
def user_page(
    username: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    return _user_page(request, gate, session, username=username)


@router.post("/admin/users/{username}/tokens")
async def create_token(
    username: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    """Answers with the user's page showing the new secret once (no redirect: the secret is
    never stored, and the page is not cached)."""
    gate = admin_gate(request, web, login_next=f"/admin/users/{username}")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    name = text_field(form, "name").strip() or "api"
    try:
        data = TokenCreate(name=name)
    except ValidationError as exc:
        errors = field_errors(request, exc)
        return await run_in_threadpool(
            lambda: _user_page(
                request,
                gate,
                session,
                username=username,
                status_code=422,
                token_name=name,
                errors=errors,
            )
        )
    try:
        token, secret = await run_in_threadpool(
            users.create_token, session, username=username, name=data.name, actor=gate.user
        )
    except DomainError as exc:
        return error_page(request, gate, exc)
    return await run_in_threadpool(
        lambda: _user_page(
            request, gate, session, username=username, secret=secret, new_token_id=token.id
        )
    )


@router.post("/admin/users/{username}/tokens/{token_id}/revoke")
async def revoke_token(
    username: str,
    token_id: TokenId,
    request: Request,
    session: SessionDep,
    web: OptionalWebUser,
) -> Response:
    gate = admin_gate(request, web, login_next=f"/admin/users/{username}")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    try:
        token = await run_in_threadpool(
            users.revoke_user_token,
            session,
            username=username,
            token_id=token_id,
            actor=gate.user,
        )
    except DomainError as exc:
        return error_page(request, gate, exc)
    return redirect_with_flash(
        request, f"/admin/users/{username}#token-{token.id}", "token-revoked", name=token.name
    )
