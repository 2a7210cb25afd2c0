"""The admin pages of a project: create (``/admin/new-project``), settings with a guidelines
preview, prompt import by file upload with the rejected lines listed, export links, and the
prompt browser with each prompt's completions and annotations.

Same services as the JSON API (``api_projects``, ``api_prompts``); every form is CSRF-checked,
succeeds with POST → redirect → GET and a flash message, and fails with the form shown again
(4xx) with the problems next to their fields.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from app.deps import OptionalWebUser, SessionDep, SettingsDep
from app.errors import (
    Conflict,
    DomainError,
    ImportRejected,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
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
from app.routes._uploads import declared_too_large, limited, too_large
from app.routes._web import csrf_failed, gettext_for
from app.schemas import MAX_ID, ProjectCreate, ProjectDetail, ProjectUpdate
from app.services import imports, members, projects, prompts
from app.services.auth_sessions import WebLogin

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
"""Prompts per page of the prompt browser."""

PromptId = Annotated[int, Path(ge=1, le=MAX_ID)]

TEXT_FIELDS = (
    "name",
    "slug",
    "guidelines",
    "completions_per_task",
    "overlap",
    "lease_seconds",
    "flags",
    "system_prompt",
    "instruction_template",
)
CHECKBOXES = ("allow_ties", "likert", "require_rationale", "members_only")
EXPORT_FORMATS = ("pairs", "rankings", "consensus", "hh")


# --------------------------------------------------------------------------- form values


def _values_of(project: ProjectDetail) -> dict[str, Any]:
    """The settings form's values for a saved project."""
    values: dict[str, Any] = {name: str(getattr(project, name)) for name in TEXT_FIELDS}
    values["flags"] = "\n".join(project.flags)
    values.update({name: getattr(project, name) for name in CHECKBOXES})
    return values


def _default_values() -> dict[str, Any]:
    defaults = {  # the API's defaults
        name: field.get_default(call_default_factory=True)
        for name, field in ProjectCreate.model_fields.items()
        if not field.is_required()
    }
    values: dict[str, Any] = {name: str(defaults.get(name, "")) for name in TEXT_FIELDS}
    values["flags"] = "\n".join(defaults["flags"])
    values["name"] = values["slug"] = ""
    values.update({name: bool(defaults[name]) for name in CHECKBOXES})
    return values


def _values_from(form: FormData) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: text_field(form, name).replace("\r\n", "\n") for name in TEXT_FIELDS
    }
    values.update({name: form.get(name) is not None for name in CHECKBOXES})
    return values


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """The values as the schemas take them (numbers still text: pydantic parses them)."""
    data = {name: values[name] for name in (*TEXT_FIELDS, *CHECKBOXES) if name != "slug"}
    data["name"] = values["name"].strip()
    data["flags"] = [line.strip() for line in values["flags"].splitlines() if line.strip()]
    for name in ("completions_per_task", "overlap", "lease_seconds"):
        data[name] = values[name].strip()
    return data


def _export_links(slug: str) -> list[dict[str, str]]:
    base = f"/api/v1/projects/{slug}/export"
    return [
        {
            "format": fmt,
            "jsonl": f"{base}?format={fmt}",
            "parquet": f"{base}?format={fmt}&file=parquet",
        }
        for fmt in EXPORT_FORMATS
    ]


def _project_page(
    request: Request,
    login: WebLogin,
    page: projects.ProjectPage,
    *,
    status_code: int = 200,
    values: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    preview: bool = False,
    import_errors: list[dict[str, Any]] | None = None,
    import_message: str | None = None,
    member_errors: list[str] | None = None,
    member_input: str = "",
) -> HTMLResponse:
    project = page.project
    return render_admin(
        request,
        "admin/project.html",
        login=login,
        status_code=status_code,
        project=project,
        members=page.members,
        member_errors=member_errors or [],
        member_input=member_input,
        values=values or _values_of(project),
        errors=errors or {},
        preview=preview,
        import_errors=import_errors,
        import_message=import_message,
        export_links=_export_links(project.slug),
        export_url=f"/api/v1/projects/{project.slug}/export",
    )


# --------------------------------------------------------------------------- create


@router.get("/admin/new-project", response_class=HTMLResponse)
def new_project_page(request: Request, web: OptionalWebUser) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    return render_admin(
        request, "admin/project_new.html", login=gate, values=_default_values(), errors={}
    )


@router.post("/admin/new-project")
async def create_project(request: Request, session: SessionDep, web: OptionalWebUser) -> Response:
    gate = admin_gate(request, web, login_next="/admin/new-project")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    values = _values_from(form)
    values["slug"] = values["slug"].strip()

    def again(status_code: int, errors: dict[str, list[str]], preview: bool = False):
        return render_admin(
            request,
            "admin/project_new.html",
            login=gate,
            status_code=status_code,
            values=values,
            errors=errors,
            preview=preview,
        )

    if form.get("action") == "preview":
        return again(200, {}, preview=True)
    try:
        data = ProjectCreate(slug=values["slug"], **_settings(values))
    except ValidationError as exc:
        return again(422, field_errors(request, exc))
    try:
        project = await run_in_threadpool(
            projects.create_project, session, data=data, actor=gate.user
        )
    except Conflict:
        _ = gettext_for(request)
        return again(409, {"slug": [_("A project with this slug already exists.")]})
    return redirect_with_flash(
        request, f"/admin/projects/{project.slug}", "project-created", name=project.name
    )


# --------------------------------------------------------------------------- settings


@router.get("/admin/projects/{slug}", response_class=HTMLResponse)
def project_page(
    slug: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    try:
        page = projects.project_page(session, slug=slug)
    except NotFound as exc:
        return error_page(request, gate, exc)
    return _project_page(request, gate, page)


@router.post("/admin/projects/{slug}")
async def save_project(
    slug: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    gate = admin_gate(request, web, login_next=f"/admin/projects/{slug}")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    values = _values_from(form)
    values["slug"] = slug
    preview = form.get("action") == "preview"
    errors: dict[str, list[str]] = {}
    data = None
    if not preview:
        try:
            data = ProjectUpdate(**_settings(values))
        except ValidationError as exc:
            errors = field_errors(request, exc)
    try:
        if data is not None:
            await run_in_threadpool(
                projects.update_project, session, slug=slug, data=data, actor=gate.user
            )
            # The form posts to …#settings; the flash is at the top of the page.
            return redirect_with_flash(request, f"/admin/projects/{slug}#flash", "project-saved")
        page = await run_in_threadpool(projects.project_page, session, slug=slug)
    except NotFound as exc:
        return error_page(request, gate, exc)
    return _project_page(
        request,
        gate,
        page,
        status_code=422 if errors else 200,
        values=values,
        errors=errors,
        preview=preview,
    )


# --------------------------------------------------------------------------- import


@router.post("/admin/projects/{slug}/import")
async def import_prompts(
    slug: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    web: OptionalWebUser,
) -> Response:
    """The upload form: the file is streamed to a temporary file (Starlette's multipart
    parser) under the import size limit, then imported all or nothing."""
    gate = admin_gate(request, web, login_next=f"/admin/projects/{slug}")
    if isinstance(gate, Response):
        return gate
    _ = gettext_for(request)
    try:  # 404 before reading a large body for a project that does not exist
        page = await run_in_threadpool(projects.project_page, session, slug=slug)
    except NotFound as exc:
        return error_page(request, gate, exc)

    def failed(status_code: int, message: str, errors: list[dict[str, Any]] | None = None):
        return _project_page(
            request,
            gate,
            page,
            status_code=status_code,
            import_message=message,
            import_errors=errors,
        )

    limit = settings.max_import_bytes
    form: FormData | None = None
    try:
        try:
            if declared_too_large(request, limit):
                raise too_large(limit)
            form = await limited(request, limit).form(max_files=1, max_fields=5)
        except PayloadTooLarge:
            return failed(
                413,
                _("The file is larger than the import limit of %(n)s bytes; nothing was written.")
                % {"n": limit},
            )
        except HTTPException:  # a malformed multipart body
            return failed(400, _("The upload could not be read; nothing was written."))
        if not csrf_ok(request, form, gate):
            return csrf_failed(request, gate)
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            return failed(422, _("Choose a file to import."))
        try:
            result = await run_in_threadpool(
                imports.import_prompts,
                session,
                project_slug=slug,
                source=upload.file,
                max_bytes=limit,
                actor=gate.user,
            )
        except ImportRejected as exc:
            shown = len(exc.errors or [])
            message = (
                _("The file was rejected: %(total)s problems (the first %(n)s are listed).")
                % {"total": exc.total, "n": shown}
                if exc.total > shown
                else _("The file was rejected: %(total)s problems.") % {"total": exc.total}
            )
            return failed(422, message + " " + _("Nothing was written."), exc.errors)
        except NotFound as exc:
            return error_page(request, gate, exc)
        except DomainError as exc:  # too large once decompressed, unreadable …
            return failed(exc.status, exc.message)
    finally:
        if form is not None:
            await form.close()
    return redirect_with_flash(
        request, f"/admin/projects/{slug}", "imported", **result.model_dump()
    )


# --------------------------------------------------------------------------- members


@router.post("/admin/projects/{slug}/members")
async def change_members(
    slug: str, request: Request, session: SessionDep, web: OptionalWebUser
) -> Response:
    """``action=add`` with ``usernames`` (one per line, or separated by commas or spaces), or
    ``action=remove`` with ``username``. Unknown users change nothing and are listed."""
    gate = admin_gate(request, web, login_next=f"/admin/projects/{slug}")
    if isinstance(gate, Response):
        return gate
    form = await read_form(request)
    if not csrf_ok(request, form, gate):
        return csrf_failed(request, gate)
    _ = gettext_for(request)
    removing = form.get("action") == "remove"
    typed = text_field(form, "username" if removing else "usernames")
    names = [n for n in re.split(r"[\s,;]+", typed) if n][:500]
    try:
        if not names:
            raise InvalidInput("no usernames", errors=[])
        change = members.remove_members if removing else members.add_members
        await run_in_threadpool(change, session, slug=slug, usernames=names, actor=gate.user)
    except NotFound as exc:
        return error_page(request, gate, exc)
    except InvalidInput as exc:
        try:
            page = await run_in_threadpool(projects.project_page, session, slug=slug)
        except NotFound as missing:
            return error_page(request, gate, missing)
        messages = [e["message"] for e in exc.errors or []] or [_("Enter at least one username.")]
        return _project_page(
            request,
            gate,
            page,
            status_code=422,
            member_errors=messages,
            member_input="" if removing else typed,
        )
    key = "member-removed" if removing else "members-added"
    return redirect_with_flash(
        request, f"/admin/projects/{slug}#members", key, names=", ".join(names)
    )


# --------------------------------------------------------------------------- prompts


@router.get("/admin/projects/{slug}/prompts", response_class=HTMLResponse)
def prompt_browser(
    slug: str,
    request: Request,
    session: SessionDep,
    web: OptionalWebUser,
    after: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    try:
        page = prompts.browse_prompts(session, project_slug=slug, after=after, limit=PAGE_SIZE)
    except DomainError as exc:
        return error_page(request, gate, exc)
    return render_admin(request, "admin/prompts.html", login=gate, page=page)


@router.get("/admin/projects/{slug}/prompts/{prompt_id}", response_class=HTMLResponse)
def prompt_page(
    slug: str,
    prompt_id: PromptId,
    request: Request,
    session: SessionDep,
    web: OptionalWebUser,
) -> Response:
    gate = admin_gate(request, web)
    if isinstance(gate, Response):
        return gate
    try:
        view = prompts.prompt_view(session, project_slug=slug, prompt_id=prompt_id)
    except NotFound as exc:
        return error_page(request, gate, exc)
    metadata = json.dumps(view.prompt.metadata, indent=2, ensure_ascii=False, sort_keys=True)
    return render_admin(request, "admin/prompt.html", login=gate, view=view, metadata=metadata)
