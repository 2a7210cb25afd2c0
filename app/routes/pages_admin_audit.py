"""The admin page of the audit log, ``/admin/audit``: every admin action, newest first, with
filters (a GET form) and keyset pages. Same service as ``api_audit``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import OptionalWebUser, SessionDep
from app.errors import DomainError, InvalidInput
from app.routes._admin import admin_gate, error_page, render_admin
from app.services import audit

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50


def _since(value: str) -> datetime | None:
    """The form's date (``2026-11-30``) or ISO 8601 time; naive means UTC."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"since: not a date or time: {value!r}") from None


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    session: SessionDep,
    web: OptionalWebUser,
    after: Annotated[str | None, Query(max_length=32)] = None,
    actor: Annotated[str, Query(max_length=64)] = "",
    action: Annotated[str, Query(max_length=64)] = "",
    target_type: Annotated[str, Query(max_length=32)] = "",
    target: Annotated[str, Query(max_length=200)] = "",
    since: Annotated[str, Query(max_length=32)] = "",
) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    filters = {
        "actor": actor.strip(),
        "action": action.strip(),
        "target_type": target_type.strip(),
        "target": target.strip(),
        "since": since.strip(),
    }
    try:
        page = audit.list_events(
            session,
            after=after,
            limit=PAGE_SIZE,
            actor=filters["actor"] or None,
            action=filters["action"] or None,
            target_type=filters["target_type"] or None,
            target=filters["target"] or None,
            since=_since(filters["since"]),
        )
    except DomainError as exc:
        return error_page(request, gate, exc)
    query = urlencode({k: v for k, v in filters.items() if v})
    return render_admin(
        request,
        "admin/audit.html",
        login=gate,
        events=[(e, json.dumps(e.details, ensure_ascii=False, sort_keys=True)) for e in page.items],
        next_url=f"/admin/audit?{query + '&' if query else ''}after={page.next}"
        if page.next
        else None,
        first_url=None if after is None else f"/admin/audit{'?' + query if query else ''}",
        filters=filters,
        actions=audit.ACTIONS,
        categories=audit.CATEGORIES,
        target_types=audit.TARGET_TYPES,
    )
