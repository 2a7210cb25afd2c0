"""Browser pages: log in, log out, choose the UI language."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.deps import WEB_SESSION_COOKIE, OptionalWebUser, SessionDep, SettingsDep
from app.errors import TooManyRequests, Unauthenticated
from app.routes._web import (
    csrf_failed,
    delete_cookie,
    form_csrf_ok,
    gettext_for,
    render,
    set_cookie,
)
from app.services import auth_sessions
from app.web import CSRF_COOKIE, LANG_COOKIE, LANG_COOKIE_MAX_AGE, LANGUAGES, safe_next

router = APIRouter(include_in_schema=False)

FormStr = Annotated[str, Form()]


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, web: OptionalWebUser, next: str = "/label") -> Response:
    if web is not None:
        return RedirectResponse(safe_next(next), 303)
    return render(request, "auth/login.html", login=None, next=safe_next(next), username="")


@router.post("/login", response_class=HTMLResponse)
def login_submit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    web: OptionalWebUser,
    username: FormStr = "",
    password: FormStr = "",
    csrf_token: FormStr = "",
    next: FormStr = "/label",
) -> Response:
    _ = gettext_for(request)
    target = safe_next(next)
    if not form_csrf_ok(request, csrf_token, web):  # a stale tab of a logged-in user is fine
        return csrf_failed(request, web)
    ip = request.client.host if request.client else "unknown"
    try:
        _row, secret = auth_sessions.login(
            session, username=username.strip(), password=password, ip=ip, settings=settings
        )
    except TooManyRequests as e:
        error = _("Too many failed attempts. Wait a minute, then try again.")
        return render(
            request,
            "auth/login.html",
            login=None,
            status_code=429,
            headers={"Retry-After": str(e.retry_after)},
            error=error,
            next=target,
            username=username,
        )
    except Unauthenticated:
        return render(
            request,
            "auth/login.html",
            login=None,
            status_code=401,
            error=_("Wrong username or password."),
            next=target,
            username=username,
        )
    response = RedirectResponse(target, 303)
    set_cookie(request, response, WEB_SESSION_COOKIE, secret, max_age=settings.session_max_age_s)
    delete_cookie(request, response, CSRF_COOKIE)
    return response


@router.post("/logout")
def logout_submit(
    request: Request, session: SessionDep, web: OptionalWebUser, csrf_token: FormStr = ""
) -> Response:
    if web is None:
        response = RedirectResponse("/login", 303)
        delete_cookie(request, response, WEB_SESSION_COOKIE)
        return response
    if not form_csrf_ok(request, csrf_token, web):
        return csrf_failed(request, web)
    auth_sessions.logout(session, token=request.cookies.get(WEB_SESSION_COOKIE, ""))
    response = RedirectResponse("/login", 303)
    delete_cookie(request, response, WEB_SESSION_COOKIE)
    return response


@router.post("/lang")
def set_language(
    request: Request,
    web: OptionalWebUser,
    lang: FormStr = "",
    next: FormStr = "/label",
    csrf_token: FormStr = "",
) -> Response:
    if not form_csrf_ok(request, csrf_token, web):
        return csrf_failed(request, web)
    response = RedirectResponse(safe_next(next), 303)
    if lang in LANGUAGES:
        set_cookie(request, response, LANG_COOKIE, lang, max_age=LANG_COOKIE_MAX_AGE)
    return response
