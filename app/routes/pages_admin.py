"""The admin page: every project with its counts (each linking to its page in
``pages_admin_projects``), and the generation jobs with their progress (followed live by
``app/static/js/admin.js`` through the jobs API in ``api_generation``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.deps import OptionalWebUser, SessionDep
from app.errors import Conflict, NotFound
from app.models import Role
from app.routes._admin import not_admin, render_admin
from app.routes._web import (
    csrf_failed,
    form_csrf_ok,
    gettext_for,
    page_language,
    render_error,
    to_login,
)
from app.schemas import MAX_ID
from app.services import generation
from app.web import ADMIN_JS_MESSAGES, js_catalog

router = APIRouter(include_in_schema=False)

JOB_LIMIT = 20
"""The newest jobs the page lists (older ones still queued or running are listed too)."""
POLL_MS = 2000

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, session: SessionDep, web: OptionalWebUser) -> Response:
    if web is None:
        return to_login(request)
    if web.user.role != Role.admin:
        return not_admin(request, web)
    overview = generation.admin_overview(session, job_limit=JOB_LIMIT)
    config = {
        "pollMs": POLL_MS,
        "urls": {
            "projectJobs": "/api/v1/projects/{slug}/jobs",
            "job": "/api/v1/jobs/{id}",
            "cancel": "/api/v1/jobs/{id}/cancel",
        },
    }
    return render_admin(
        request,
        "admin/home.html",
        login=web,
        overview=overview,
        job_limit=JOB_LIMIT,
        config=config,
        js_catalog=js_catalog(page_language(request), ADMIN_JS_MESSAGES),
    )


@router.post("/admin/jobs/{job_id}/cancel")
def cancel_job(
    request: Request,
    job_id: JobId,
    session: SessionDep,
    web: OptionalWebUser,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """The cancel button without JavaScript (the script calls the JSON API instead)."""
    if web is None:
        return RedirectResponse("/login?next=/admin", 303)
    if web.user.role != Role.admin:
        return not_admin(request, web)
    _ = gettext_for(request)
    if not form_csrf_ok(request, csrf_token, web):
        return csrf_failed(request, web)
    try:
        generation.cancel_job(session, job_id=job_id, actor=web.user)
    except NotFound:
        return render_error(
            request,
            login=web,
            status_code=404,
            heading=_("Job not found"),
            message=_("There is no generation job with this number."),
        )
    except Conflict:
        return render_error(
            request,
            login=web,
            status_code=409,
            heading=_("The job has already finished"),
            message=_("Only queued or running jobs can be cancelled."),
        )
    return RedirectResponse(f"/admin#job-{job_id}", 303)
