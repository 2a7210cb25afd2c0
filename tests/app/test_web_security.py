"""Web security over HTTP: CSRF on every state-changing form and on cookie-authenticated API
writes, the security headers on every kind of response, the cookies' flags, and secrets kept
out of the logs (and out of the database in clear)."""

from __future__ import annotations

import io
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import CSRF_HEADER, WEB_SESSION_COOKIE
from app.main import create_app
from app.models import (
    ApiToken,
    GenerationJob,
    Project,
    ProjectMember,
    Prompt,
    Role,
    User,
    WebSession,
)
from app.web import CSRF_COOKIE, LANG_COOKIE
from tests.app.test_auth_matrix import _routes, db_state, web_login
from tests.factories import (
    PASSWORD,
    auth,
    make_project,
    make_prompt,
    make_token,
    make_user,
    use_session,
)

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


# --------------------------------------------------------------------------- CSRF: forms


@dataclass
class Ctx:
    session: Session
    admin: User
    ann: User
    project: Project
    job_id: int
    token_id: int


def _project_fields(name: str, slug: str = "") -> dict[str, str]:
    return {
        "name": name,
        "slug": slug,
        "guidelines": "Be kind.",
        "completions_per_task": "4",
        "overlap": "3",
        "lease_seconds": "600",
        "flags": "unsafe",
        "system_prompt": "",
        "instruction_template": "",
    }


@dataclass(frozen=True)
class Form:
    """A state-changing page route: who submits it, the fields that make it succeed, what a
    success answers (status), and a check that it did its work."""

    role: str  # anon | annotator | admin
    fields: Callable[[Ctx], dict[str, str]]
    ok_status: int
    done: Callable[[Ctx, Any], bool]
    files: bool = False


def _user_active(ctx: Ctx) -> bool:
    ctx.session.expire_all()
    return ctx.session.get(User, ctx.ann.id).active


FORMS: dict[tuple[str, str], Form] = {
    ("POST", "/login"): Form(
        "anon",
        lambda c: {"username": c.ann.username, "password": PASSWORD, "next": "/label"},
        303,
        lambda c, r: WEB_SESSION_COOKIE in r.cookies,
    ),
    ("POST", "/logout"): Form(
        "annotator",
        lambda c: {},
        303,
        lambda c, r: (
            c.session.scalar(select(WebSession.id).where(WebSession.user_id == c.ann.id)) is None
        ),
    ),
    ("POST", "/lang"): Form(
        "annotator",
        lambda c: {"lang": "zh_CN", "next": "/label"},
        303,
        lambda c, r: r.cookies.get(LANG_COOKIE) == "zh_CN",
    ),
    ("POST", "/admin/jobs/{job_id}/cancel"): Form(
        "admin",
        lambda c: {},
        303,
        lambda c, r: c.session.get(GenerationJob, c.job_id).cancel_requested,
    ),
    ("POST", "/admin/new-project"): Form(
        "admin",
        lambda c: _project_fields("Fresh", "csrf-fresh"),
        303,
        lambda c, r: (
            c.session.scalar(select(Project.id).where(Project.slug == "csrf-fresh")) is not None
        ),
    ),
    ("POST", "/admin/projects/{slug}"): Form(
        "admin",
        lambda c: _project_fields("Renamed by the form"),
        303,
        lambda c, r: c.session.get(Project, c.project.id).name == "Renamed by the form",
    ),
    ("POST", "/admin/projects/{slug}/import"): Form(
        "admin",
        lambda c: {},
        303,
        lambda c, r: (
            c.session.scalar(
                select(Prompt.id).where(
                    Prompt.project_id == c.project.id, Prompt.external_id == "x1"
                )
            )
            is not None
        ),
        files=True,
    ),
    ("POST", "/admin/projects/{slug}/members"): Form(
        "admin",
        lambda c: {"action": "add", "usernames": c.ann.username},
        303,
        lambda c, r: c.session.get(ProjectMember, (c.project.id, c.ann.id)) is not None,
    ),
    ("POST", "/admin/users"): Form(
        "admin",
        lambda c: {"username": "csrf-newbie", "role": "annotator", "password": "long enough pw 1"},
        303,
        lambda c, r: (
            c.session.scalar(select(User.id).where(User.username == "csrf-newbie")) is not None
        ),
    ),
    ("POST", "/admin/users/{username}/active"): Form(
        "admin", lambda c: {"active": "0"}, 303, lambda c, r: not _user_active(c)
    ),
    ("POST", "/admin/users/{username}/tokens"): Form(
        "admin", lambda c: {"name": "made-by-form"}, 200, lambda c, r: "pf_" in r.text
    ),
    ("POST", "/admin/users/{username}/tokens/{token_id}/revoke"): Form(
        "admin",
        lambda c: {},
        303,
        lambda c, r: c.session.get(ApiToken, c.token_id).revoked_at is not None,
    ),
}


def page_write_routes(app) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in _routes(app.routes)
        if not getattr(route, "path", "/api/").startswith("/api/")
        for method in getattr(route, "methods", None) or ()
        if method in UNSAFE
    }


def make_ctx(session: Session) -> Ctx:
    admin = make_user(session, role=Role.admin)
    ann = make_user(session)
    project = make_project(session)
    make_prompt(session, project)
    job = GenerationJob(project_id=project.id, backend="builtin", models=["m"], k=2, total=1)
    session.add(job)
    session.commit()
    make_token(session, ann, name="to-revoke")
    token_id = session.scalar(select(ApiToken.id).where(ApiToken.user_id == ann.id))
    return Ctx(session, admin, ann, project, job.id, token_id)


def url_for(path: str, ctx: Ctx) -> str:
    values = {
        "slug": ctx.project.slug,
        "username": ctx.ann.username,
        "job_id": str(ctx.job_id),
        "token_id": str(ctx.token_id),
        "lease_id": "999999",  # none: the CSRF check comes first
        "prompt_id": "999999",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def test_every_page_write_route_is_covered(app):
    assert page_write_routes(app) == set(FORMS)


@pytest.mark.parametrize(("method", "path"), sorted(FORMS))
def test_form_refused_without_its_csrf_token(app, session, method, path):
    ctx = make_ctx(session)
    form = FORMS[(method, path)]
    user = {"anon": None, "annotator": ctx.ann, "admin": ctx.admin}[form.role]
    client, token = web_login(app, session, user)
    _, someone_elses = web_login(app, session, make_user(session, role=Role.admin))
    url = url_for(path, ctx)
    fields = form.fields(ctx)
    files = (
        {"file": ("p.jsonl", io.BytesIO(b'{"id": "x1", "prompt": "Hi?"}\n'), "text/plain")}
        if form.files
        else None
    )

    for bad in (None, "", "forged-" + secrets.token_urlsafe(16), token[:-2], someone_elses):
        data = dict(fields) if bad is None else {**fields, "csrf_token": bad}
        if files:
            files["file"][1].seek(0)
        before = db_state(session)
        r = client.request(method, url, data=data, files=files, follow_redirects=False)
        assert r.status_code == 403, (bad, r.status_code, r.text[:300])
        assert "The form has expired" in r.text
        assert db_state(session) == before, f"{method} {url} wrote without a valid CSRF token"
        assert WEB_SESSION_COOKIE not in r.cookies
        assert LANG_COOKIE not in r.cookies

    # The very same form with its token goes through: the token was all that was missing.
    if files:
        files["file"][1].seek(0)
    r = client.request(
        method, url, data={**fields, "csrf_token": token}, files=files, follow_redirects=False
    )
    assert r.status_code == form.ok_status, r.text[:500]
    assert form.done(ctx, r)


def test_login_csrf_cookie_and_token_must_match(app, session):
    """The pre-login token is a signed double-submit pair: a token from one browser does not
    work with another browser's cookie, nor without the cookie."""
    user = make_user(session)
    a, token_a = web_login(app, session, None)
    b, token_b = web_login(app, session, None)
    assert token_a != token_b
    data = {"username": user.username, "password": PASSWORD}
    assert b.post("/login", data={**data, "csrf_token": token_a}).status_code == 403
    c = TestClient(app)  # no prefero_csrf cookie at all
    assert c.post("/login", data={**data, "csrf_token": token_a}).status_code == 403
    ok = a.post("/login", data={**data, "csrf_token": token_a}, follow_redirects=False)
    assert ok.status_code == 303


class FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"method": (a.get("method") or "get").lower(), "action": a.get("action"), "in": {}}
            )
        elif tag in ("input", "button") and self.forms and a.get("name"):
            self.forms[-1]["in"].setdefault(a["name"], a.get("value"))

    def handle_endtag(self, tag: str) -> None:
        pass


def _template_of(action: str, routes: set[tuple[str, str]]) -> tuple[str, str] | None:
    path = urlsplit(action).path
    for method, template in routes:
        pattern = "^" + re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return method, template
    return None


def test_every_rendered_post_form_carries_the_csrf_token(app, session):
    """Crawl every page as its users; every ``<form method=post>`` carries the session's CSRF
    token (the signed pre-login one on the login page) and posts to a route of :data:`FORMS`;
    together the pages have a form for every one of them."""
    ctx = make_ctx(session)
    admin, admin_token = web_login(app, session, ctx.admin)
    ann, ann_token = web_login(app, session, ctx.ann)
    anon, anon_token = web_login(app, session, None)
    prompt_id = session.scalar(select(Prompt.id).where(Prompt.project_id == ctx.project.id))
    slug, name = ctx.project.slug, ctx.ann.username
    pages = [
        (anon, anon_token, "/login"),
        (ann, ann_token, "/label"),
        (ann, ann_token, f"/label/{slug}"),
        (ann, ann_token, "/admin"),  # the 403 page still has the logout and language forms
        (admin, admin_token, "/admin"),
        (admin, admin_token, "/admin/new-project"),
        (admin, admin_token, f"/admin/projects/{slug}"),
        (admin, admin_token, f"/admin/projects/{slug}/prompts"),
        (admin, admin_token, f"/admin/projects/{slug}/prompts/{prompt_id}"),
        (admin, admin_token, f"/admin/projects/{slug}/dashboard"),
        (admin, admin_token, "/admin/users"),
        (admin, admin_token, f"/admin/users/{name}"),
        (admin, admin_token, "/admin/audit"),
    ]
    routes = set(FORMS)
    seen: set[tuple[str, str]] = set()
    for client, token, url in pages:
        r = client.get(url, follow_redirects=False)
        assert r.status_code in (200, 403), (url, r.status_code)
        parser = FormParser()
        parser.feed(r.text)
        for form in parser.forms:
            if form["method"] != "post":
                continue
            where = f"{url}: form → {form['action']}"
            assert form["in"].get("csrf_token") == token, where
            route = _template_of(form["action"] or url, routes)
            assert route is not None, f"{where} posts to a route FORMS does not cover"
            seen.add(route)
    assert seen == routes, f"no form found for {sorted(routes - seen)}"


# --------------------------------------------------------------------------- CSRF: API

API_BODIES = {
    "/api/v1/leases/{lease_id}/submit": {"ranking": [[1]]},
    "/api/v1/users/{username}": {"active": False},
    "/api/v1/projects": {"name": "X", "slug": "api-csrf"},
    "/api/v1/users": {"username": "api-csrf", "role": "annotator"},
    "/api/v1/projects/{slug}/members": {"usernames": ["nobody"]},
    "/api/v1/users/{username}/tokens": {"name": "t"},
}


def api_write_routes(app) -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        if path.startswith("/api/")
        for method in ops
        if method.upper() in UNSAFE
    )


def test_api_writes_with_the_session_cookie_need_the_csrf_header(app, session):
    ctx = make_ctx(session)
    browser, csrf = web_login(app, session, ctx.admin)
    bearer = auth(make_token(session, ctx.admin))
    routes = api_write_routes(app)
    assert len(routes) >= 10
    for method, path in routes:
        url = url_for(path, ctx)
        body = API_BODIES.get(path, {})
        for header in ({}, {CSRF_HEADER: ""}, {CSRF_HEADER: "wrong"}, {CSRF_HEADER: csrf[:-1]}):
            before = db_state(session)
            r = browser.request(method, url, json=body, headers=header)
            assert r.status_code == 403, (method, url, header, r.text)
            assert CSRF_HEADER in r.json()["detail"]
            assert db_state(session) == before, f"{method} {url} wrote without the CSRF header"
        with_header = browser.request(method, url, json=body, headers={CSRF_HEADER: csrf})
        assert with_header.status_code not in (401, 403), (method, url, with_header.text)
        # A bearer token is not sent by browsers on their own: no CSRF header needed.
        anon = TestClient(app)
        r = anon.request(method, url, json=body, headers=bearer)
        assert r.status_code not in (401, 403), (method, url, r.text)
    # Reading needs no header.
    assert browser.get("/api/v1/projects").status_code == 200


# --------------------------------------------------------------------------- headers


def check_security_headers(r, what: str) -> None:
    h = r.headers
    csp = h.get("content-security-policy", "")
    directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";") if d.strip()}
    script = directives.get("script-src") or directives.get("default-src", "")
    assert script, f"{what}: no script-src/default-src in CSP {csp!r}"
    assert "'unsafe-inline'" not in script, f"{what}: {csp}"
    assert "'unsafe-eval'" not in script, f"{what}: {csp}"
    assert "'self'" in script, f"{what}: {csp}"
    assert "*" not in script.split(), f"{what}: {csp}"
    assert directives.get("object-src") == "object-src 'none'", f"{what}: {csp}"
    assert directives.get("frame-ancestors") == "frame-ancestors 'none'", f"{what}: {csp}"
    assert directives.get("base-uri") in ("base-uri 'none'", "base-uri 'self'"), f"{what}: {csp}"
    assert h.get("x-content-type-options") == "nosniff", what
    assert h.get("x-frame-options") == "DENY", what
    assert h.get("referrer-policy") in ("same-origin", "no-referrer", "strict-origin"), what


def _boom_app(settings: Settings, session: Session):
    app = create_app(settings)

    use_session(app, session)

    @app.get("/test-boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("unexpected failure in a route")

    return app


def test_security_headers_on_every_kind_of_response(settings, session):
    app = _boom_app(settings, session)
    admin = make_user(session, role=Role.admin)
    token = auth(make_token(session, admin))
    browser, _ = web_login(app, session, admin)
    c = TestClient(app, raise_server_exceptions=False)
    big = settings.max_request_bytes + 1 if hasattr(settings, "max_request_bytes") else 10**7
    cases = {
        "HTML page": c.get("/login"),
        "HTML admin page": browser.get("/admin"),
        "HTML 404 page": browser.get("/admin/projects/no-such-project"),
        "redirect": c.get("/label", follow_redirects=False),
        "JSON": c.get("/healthz"),
        "JSON API": c.get("/api/v1/projects", headers=token),
        "JSON 401": c.get("/api/v1/projects"),
        "JSON 403": browser.post("/api/v1/projects", json={}),
        "JSON 404 unknown path": c.get("/no/such/path"),
        "JSON 404 resource": c.get("/api/v1/projects/no-such", headers=token),
        "JSON 405": c.post("/healthz"),
        "JSON 422": c.post("/api/v1/projects", json={"slug": "Not A Slug"}, headers=token),
        "JSON 413": c.post(
            "/api/v1/projects", content=b"x" * big, headers={**token, "content-type": "text/plain"}
        ),
        "500": c.get("/test-boom"),
        "static CSS": c.get("/static/css/app.css"),
        "static JS": c.get("/static/js/label.js"),
        "static 404": c.get("/static/nope.js"),
        "OpenAPI": c.get("/openapi.json"),
        "Swagger UI": c.get("/docs"),
        "CSV": c.get(f"/api/v1/projects/{make_project(session).slug}/stats.csv", headers=token),
    }
    if any(getattr(r, "path", "") == "/metrics" for r in _routes(app.routes)):
        cases["metrics"] = c.get("/metrics", headers=token)
    statuses = {what: r.status_code for what, r in cases.items()}
    expected = {"500": 500, "JSON 413": 413, "JSON 422": 422, "static 404": 404, "JSON 405": 405}
    assert {k: statuses[k] for k in expected} == expected, statuses
    for what, r in cases.items():
        check_security_headers(r, f"{what} ({r.status_code})")
    assert cases["500"].json() == {"detail": "internal server error"}
    assert "Traceback" not in cases["500"].text
    assert "unexpected failure" not in cases["500"].text


# --------------------------------------------------------------------------- cookies


def _set_cookies(response) -> dict[str, str]:
    return {header.split("=", 1)[0]: header for header in response.headers.get_list("set-cookie")}


def _flags(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")[1:]]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts}


def _all_cookies_of_a_visit(app, session: Session, base_url: str) -> dict[str, str]:
    """Visits that set every cookie the app uses: csrf, session, lang, flash, and logout's
    deletion of the session cookie."""
    admin = make_user(session, role=Role.admin)
    client = TestClient(app, base_url=base_url)
    seen: dict[str, str] = {}
    r = client.get("/login")
    seen.update(_set_cookies(r))
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
    r = client.post(
        "/login",
        data={"username": admin.username, "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    seen.update(_set_cookies(r))
    csrf = session.scalar(select(WebSession.csrf_token).where(WebSession.user_id == admin.id))
    r = client.post("/lang", data={"lang": "en", "csrf_token": csrf}, follow_redirects=False)
    seen.update(_set_cookies(r))
    r = client.post(
        "/admin/users",
        data={"username": "cookie-check", "role": "annotator", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    seen.update(_set_cookies(r))
    r = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    seen["logout:" + WEB_SESSION_COOKIE] = _set_cookies(r)[WEB_SESSION_COOKIE]
    return seen


@pytest.mark.parametrize("secure", [False, True])
def test_cookie_flags(settings, session, secure):
    """``PREFERO_SESSION_COOKIE_SECURE`` (for HTTPS deployments) adds Secure to every cookie;
    without it plain-HTTP development works. HttpOnly, SameSite=Lax, Path=/, host-only
    always."""
    settings = settings.model_copy(update={"session_cookie_secure": secure})
    app = create_app(settings)

    use_session(app, session)
    seen = _all_cookies_of_a_visit(app, session, "https://testserver" if secure else "http://t")
    expected = {CSRF_COOKIE, WEB_SESSION_COOKIE, LANG_COOKIE, "prefero_flash"}
    assert expected | {"logout:" + WEB_SESSION_COOKIE} <= set(seen), sorted(seen)
    for _name, header in seen.items():
        flags = _flags(header)
        assert "httponly" in flags, header
        assert flags.get("samesite", "").lower() in ("lax", "strict"), header
        assert flags.get("path") == "/", header
        assert "domain" not in flags, header  # host-only
        assert ("secure" in flags) is secure, header
    session_cookie = _flags(seen[WEB_SESSION_COOKIE])
    assert int(session_cookie["max-age"]) == settings.session_max_age_s
    assert int(_flags(seen["logout:" + WEB_SESSION_COOKIE])["max-age"]) == 0
    app.state.engine.dispose()


def test_session_cookie_is_an_opaque_random_secret(app, session):
    """The cookie holds no user data, and only its SHA-256 is stored."""
    user = make_user(session)
    client, token = web_login(app, session, None)
    r = client.post(
        "/login",
        data={"username": user.username, "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    value = r.cookies[WEB_SESSION_COOKIE]
    assert len(value) >= 40
    assert user.username not in value
    stored = session.scalars(select(WebSession.token_hash)).all()
    assert value not in stored
    assert len(stored) == 1


# --------------------------------------------------------------------------- secrets in logs


def test_secrets_never_logged(database_url, tmp_path, session, caplog):
    secret_key = "sk-" + secrets.token_hex(24)
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, secret_key=secret_key
    )
    app = _boom_app(settings, session)
    admin = make_user(session, role=Role.admin)
    admin_token = make_token(session, admin)
    new_password = "pw-" + secrets.token_hex(12)
    caplog.set_level(logging.DEBUG)  # every logger, SQLAlchemy's included

    secrets_seen: dict[str, str] = {"secret key": secret_key, "admin token": admin_token}
    with TestClient(app, raise_server_exceptions=False) as api:
        r = api.post(
            "/api/v1/users",
            json={"username": "log-check", "role": "annotator", "password": new_password},
            headers=auth(admin_token),
        )
        assert r.status_code == 201, r.text
        secrets_seen["password"] = new_password
        r = api.post(
            "/api/v1/users/log-check/tokens", json={"name": "t"}, headers=auth(admin_token)
        )
        assert r.status_code == 201, r.text
        user_token = r.json()["token"]
        secrets_seen["user token"] = user_token
        project = make_project(session)
        make_prompt(session, project)
        assert (
            api.get(
                f"/api/v1/projects/{project.slug}/tasks/next", headers=auth(user_token)
            ).status_code
            == 200
        )
        # A wrong password, a login, API calls with the session cookie, a page token, a crash.
        browser = TestClient(app, raise_server_exceptions=False)
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        data = {"username": "log-check", "csrf_token": token.group(1)}
        assert (
            browser.post("/login", data={**data, "password": new_password + "x"}).status_code == 401
        )
        r = browser.post("/login", data={**data, "password": new_password}, follow_redirects=False)
        assert r.status_code == 303
        secrets_seen["session cookie"] = browser.cookies[WEB_SESSION_COOKIE]
        assert browser.get(f"/label/{project.slug}").status_code == 200
        assert browser.get(f"/api/v1/projects/{project.slug}/tasks/next").status_code == 200
        admin_browser, csrf = web_login(app, session, admin)
        r = admin_browser.post(
            "/admin/users/log-check/tokens", data={"name": "page", "csrf_token": csrf}
        )
        page_token = re.search(r"pf_[A-Za-z0-9_-]{20,}", r.text)
        assert page_token, r.text[:500]
        secrets_seen["page token"] = page_token.group(0)
        r = api.get("/api/v1/projects/x", headers=auth(user_token + "tampered"))
        assert r.status_code == 401
        assert api.get("/test-boom", headers=auth(admin_token)).status_code == 500

    names = {record.name for record in caplog.records}
    assert "prefero.access" in names, f"no access log captured: {sorted(names)}"
    formatters = [logging.Formatter("%(name)s %(levelname)s %(message)s")]
    try:
        from app.observability import JsonFormatter, TextFormatter

        formatters += [JsonFormatter(), TextFormatter()]
    except ImportError:
        pass
    lines = []
    for record in caplog.records:
        for f in formatters:
            lines.append(f.format(record))
        lines.append(repr(record.__dict__))
    text = "\n".join(lines)
    for what, value in secrets_seen.items():
        assert value not in text, f"the {what} appears in the logs"
        assert value not in repr(db_state(session)), f"the {what} is stored in clear"
