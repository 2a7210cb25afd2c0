"""Shared by the admin pages: the admin-only gate, flash messages across a POST → redirect →
GET, domain errors as HTML pages, and validation errors as per-field messages.

**Flash messages** travel in a short-lived cookie, ``prefero_flash``: a message key from
:data:`FLASH_MESSAGES` and its parameters, signed with the server's secret key (so no other
site, nor a crafted link, can make an admin page say something it did not). The next admin
page rendered shows it once and deletes the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from app.errors import Conflict, DomainError, NotFound
from app.models import Role
from app.routes._web import (
    delete_cookie,
    form_csrf_ok,
    gettext_for,
    render,
    render_error,
    set_cookie,
    to_login,
)
from app.services.auth_sessions import WebLogin
from app.web import N_

FLASH_COOKIE = "prefero_flash"
FLASH_MAX_AGE = 120

FLASH_MESSAGES: dict[str, str] = {
    "project-created": N_("Project “%(name)s” created. Import prompts below."),
    "project-saved": N_("Settings saved."),
    "imported": N_(
        "Import finished: %(created)s prompts created, %(skipped)s already present; "
        "%(completions_created)s completions added, %(completions_skipped)s already present."
    ),
    "members-added": N_("Members added: %(names)s."),
    "member-removed": N_("Removed from the members: %(names)s."),
    "user-created": N_("User “%(username)s” created."),
    "user-deactivated": N_(
        "“%(username)s” is deactivated: their browser sessions have ended and their tokens "
        "no longer work."
    ),
    "user-reactivated": N_("“%(username)s” is active again."),
    "token-revoked": N_("Token “%(name)s” revoked: it no longer works."),
}
"""The flash messages (message ids for gettext, ``%(name)s`` placeholders)."""


def not_admin(request: Request, login: WebLogin) -> HTMLResponse:
    _ = gettext_for(request)
    return render_error(
        request,
        login=login,
        status_code=403,
        heading=_("Administrators only"),
        message=_("This page is for administrators. Ask one to give you the admin role."),
    )


def admin_gate(
    request: Request, web: WebLogin | None, *, login_next: str | None = None
) -> WebLogin | Response:
    """The admin's login, or the response to send instead: anonymous visitors go to the login
    page (coming back to ``login_next``, by default this page), others get the 403 page."""
    if web is None:
        if login_next is None:
            return to_login(request)
        return RedirectResponse(f"/login?next={quote(login_next, safe='/')}", 303)
    if web.user.role != Role.admin:
        return not_admin(request, web)
    return web


async def read_form(request: Request) -> FormData:
    """An urlencoded admin form (a Markdown text of up to 200,000 characters fits)."""
    return await request.form(max_files=0, max_fields=50, max_part_size=2 * 1024 * 1024)


def csrf_ok(request: Request, form: FormData, login: WebLogin) -> bool:
    token = form.get("csrf_token")
    return form_csrf_ok(request, token if isinstance(token, str) else None, login)


def text_field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


# --------------------------------------------------------------------------- flash


def _sign(request: Request, payload: str) -> str:
    key = request.app.state.settings.get_secret_key().encode()
    mac = hmac.new(key, b"prefero-flash:" + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def redirect_with_flash(
    request: Request, url: str, key: str, **params: str | int
) -> RedirectResponse:
    """303 to ``url``, whose page then shows the flash message ``key``."""
    if key not in FLASH_MESSAGES:
        raise KeyError(key)
    raw = json.dumps({"k": key, "p": params}, separators=(",", ":"), ensure_ascii=True)
    payload = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    response = RedirectResponse(url, 303)
    set_cookie(
        request,
        response,
        FLASH_COOKIE,
        f"{payload}.{_sign(request, payload)}",
        max_age=FLASH_MAX_AGE,
    )
    return response


def take_flash(request: Request) -> str | None:
    """The flash message the cookie carries, translated, or None (absent, forged, unknown)."""
    cookie = request.cookies.get(FLASH_COOKIE)
    if not cookie or len(cookie) > 2000 or cookie.count(".") != 1:
        return None
    payload, signature = cookie.split(".")
    if not hmac.compare_digest(_sign(request, payload), signature):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        message = FLASH_MESSAGES[data["k"]]
        params = {k: v for k, v in data["p"].items() if isinstance(v, str | int)}
        return gettext_for(request)(message) % params
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def render_admin(
    request: Request,
    name: str,
    *,
    login: WebLogin,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """:func:`render` with the pending flash message (shown once)."""
    flash = take_flash(request) if status_code == 200 else None
    response = render(request, name, login=login, status_code=status_code, flash=flash, **context)
    if FLASH_COOKIE in request.cookies:
        delete_cookie(request, response, FLASH_COOKIE)
    return response


# --------------------------------------------------------------------------- errors


def error_page(request: Request, login: WebLogin, exc: DomainError) -> HTMLResponse:
    """A domain error as an HTML page with its status (404, 409, 422 …)."""
    _ = gettext_for(request)
    if isinstance(exc, NotFound):
        heading = _("Not found")
    elif isinstance(exc, Conflict):
        heading = _("That could not be done")
    else:
        heading = _("The request was not accepted")
    return render_error(
        request, login=login, status_code=exc.status, heading=heading, message=exc.message
    )


LIST_FIELDS = frozenset({"flags"})
"""Form fields whose value is a list (one entry per line)."""


def field_errors(request: Request, exc: ValidationError) -> dict[str, list[str]]:
    """Pydantic's errors by top-level field, in words an admin reads next to the field."""
    _ = gettext_for(request)
    out: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = error.get("loc") or ("",)
        field = str(loc[0])
        ctx = error.get("ctx") or {}
        kind = error.get("type", "")
        if kind == "int_parsing" or kind == "int_type":
            text = _("Enter a whole number.")
        elif kind == "greater_than_equal":
            text = _("Must be at least %(n)s.") % {"n": ctx.get("ge")}
        elif kind == "less_than_equal":
            text = _("Must be at most %(n)s.") % {"n": ctx.get("le")}
        elif kind in ("too_long", "too_short") and field in LIST_FIELDS and len(loc) == 1:
            text = _("At most %(n)s entries.") % {"n": ctx.get("max_length")}
        elif kind in ("string_too_short", "too_short"):  # too_short: an optional text
            text = (
                _("Required.")
                if ctx.get("min_length") == 1
                else _("At least %(n)s characters.") % {"n": ctx.get("min_length")}
            )
        elif kind in ("string_too_long", "too_long"):
            text = _("At most %(n)s characters.") % {"n": ctx.get("max_length")}
        elif kind == "string_pattern_mismatch" and field == "slug":
            text = _("Lower-case letters, digits and '-', 1–64 characters, e.g. 'helpful-v1'.")
        elif kind == "string_pattern_mismatch" and field == "username":
            text = _("1–64 characters: letters, digits, '_', '.', '@', '-'.")
        else:
            text = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if len(loc) > 1 and isinstance(loc[1], int):
            text = _("Line %(n)s: %(message)s") % {"n": loc[1] + 1, "message": text}
        messages = out.setdefault(field, [])
        if text not in messages:
            messages.append(text)
    return out
