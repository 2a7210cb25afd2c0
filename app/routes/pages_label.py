"""Browser pages for annotators: their projects, and the labeling page of one project (whose
script then talks to the labeling API in ``api_tasks``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import OptionalWebUser, SessionDep
from app.errors import Forbidden, NotFound
from app.routes._web import gettext_for, page_language, render, render_error, to_login
from app.services import tasks
from app.web import js_catalog

router = APIRouter(include_in_schema=False)


@router.get("/label", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, web: OptionalWebUser) -> Response:
    if web is None:
        return to_login(request)
    projects = tasks.annotator_home(session, user=web.user)
    return render(request, "label/home.html", login=web, projects=projects)


@router.get("/label/{slug}", response_class=HTMLResponse)
def label_page(request: Request, slug: str, session: SessionDep, web: OptionalWebUser) -> Response:
    if web is None:
        return to_login(request)
    try:
        project = tasks.labeling_context(session, slug=slug, user=web.user)
    except (NotFound, Forbidden) as e:
        _ = gettext_for(request)
        missing = isinstance(e, NotFound)
        return render_error(
            request,
            login=web,
            status_code=e.status,
            heading=_("Project not found") if missing else _("Not a member of this project"),
            message=_("There is no project at this address.")
            if missing
            else _("This project is open to its members only. Ask an administrator to add you."),
        )
    config = {
        "slug": project.slug,
        "k": project.completions_per_task,
        "allowTies": project.allow_ties,
        "likert": project.likert,
        "flags": project.flags,
        "requireRationale": project.require_rationale,
        "leaseSeconds": project.lease_seconds,
        "pendingGeneration": project.pending_generation,
        "urls": {
            "next": f"/api/v1/projects/{project.slug}/tasks/next",
            "leases": "/api/v1/leases/",
        },
    }
    return render(
        request,
        "label/task.html",
        login=web,
        project=project,
        config=config,
        js_catalog=js_catalog(page_language(request)),
    )
