"""Shared by the HTML page routes: rendering with the request's language, CSRF tokens for
forms, cookies and the redirect to the login page."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from app.services.auth_sessions import WebLogin
from app.web import (
    CSRF_COOKIE,
    HTML_LANG,
    LANG_COOKIE,
    check_signed_csrf,
    make_environment,
    negotiate_language,
    new_csrf_nonce,
    same_token,
    signed_csrf_token,
    translations,
)

templates = Jinja2Templates(env=make_environment())


def page_language(request: Request) -> str:
    return negotiate_language(
        request.cookies.get(LANG_COOKIE), request.headers.get("accept-language")
    )


def _secret_key(request: Request) -> str:
    return request.app.state.settings.get_secret_key()


def _cookie_secure(request: Request) -> bool:
    """Secure cookies when configured, and always over HTTPS (directly, or behind a trusted
    proxy that says so in X-Forwarded-Proto: `prefero serve` runs with proxy headers on)."""
    return bool(request.app.state.settings.session_cookie_secure) or request.url.scheme == "https"


def current_path(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def form_csrf_ok(request: Request, token: str | None, login: WebLogin | None) -> bool:
    """A logged-in user's form carries the session's token; a form shown before login carries
    the signed double-submit token matching the ``prefero_csrf`` cookie."""
    if login is not None and same_token(login.session.csrf_token, token):
        return True
    return check_signed_csrf(_secret_key(request), request.cookies.get(CSRF_COOKIE), token)


def render(
    request: Request,
    name: str,
    *,
    login: WebLogin | None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    lang = page_language(request)
    new_nonce = None
    if login is not None:
        csrf = login.session.csrf_token
    else:
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or len(nonce) > 200:
            nonce = new_nonce = new_csrf_nonce()
        csrf = signed_csrf_token(_secret_key(request), nonce)
    response = templates.TemplateResponse(
        request,
        name,
        {
            "translations": translations(lang),
            "lang": lang,
            "html_lang": HTML_LANG[lang],
            "user": login.user if login else None,
            "csrf_token": csrf,
            "current_path": current_path(request),
            **context,
        },
        status_code=status_code,
        headers=headers,
    )
    if new_nonce is not None:
        set_cookie(request, response, CSRF_COOKIE, new_nonce, max_age=None)
    # Pages carry CSRF tokens and the user's data: never stored by caches.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Vary"] = "Cookie, Accept-Language"
    return response


def render_error(
    request: Request, *, login: WebLogin | None, status_code: int, heading: str, message: str
) -> HTMLResponse:
    return render(
        request,
        "error.html",
        login=login,
        status_code=status_code,
        heading=heading,
        message=message,
    )


def csrf_failed(request: Request, login: WebLogin | None) -> HTMLResponse:
    """The 403 page for a form whose CSRF token did not verify."""
    _ = gettext_for(request)
    return render_error(
        request,
        login=login,
        status_code=403,
        heading=_("The form has expired"),
        message=_("The form could not be verified. Go back, reload the page and try again."),
    )


def set_cookie(
    request: Request,
    response: Any,
    name: str,
    value: str,
    *,
    max_age: int | None,
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_cookie_secure(request),
    )


def delete_cookie(request: Request, response: Any, name: str) -> None:
    response.delete_cookie(
        name, path="/", httponly=True, samesite="lax", secure=_cookie_secure(request)
    )


def to_login(request: Request) -> RedirectResponse:
    """The login page, coming back here afterwards."""
    return RedirectResponse(f"/login?next={quote(current_path(request), safe='/')}", 303)


def gettext_for(request: Request):
    """``gettext`` in the request's language, for messages built in a route."""
    return translations(page_language(request)).gettext
