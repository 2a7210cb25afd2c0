"""Every route × {anonymous, annotator, other annotator, admin}.

:data:`EXPECTED` lists the expected answer of each route to each caller; the test fails when a
route exists that the table does not cover (or the table names one that does not exist), so a
new route cannot ship without a decision about who may call it.

- **annotator** (``ann``) is a member of the members-only project the URLs name and owns the
  lease and the token they name; **other** is an annotator who is not a member and acts on
  ``ann``'s lease; **admin** is an admin.
- API routes and ``/metrics`` are called with bearer tokens; pages with a browser session
  cookie and a valid CSRF token in forms (the CSRF checks themselves: ``test_web_security``).
- A refused call (401, 403, redirect to the login page) writes nothing: every table's rows are
  compared before and after (``api_token.last_used_at`` aside, which any valid token updates).

Also here: revoked tokens and deactivated users lose access on their next request, and the
login answers an unknown username exactly like a wrong password (same argon2 work).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import CSRF_HEADER, WEB_SESSION_COOKIE
from app.models import ApiToken, Base, ProjectMember, Role, User, WebSession, utcnow
from app.security import hash_token
from app.services import tasks
from tests.app.test_pages import form_token
from tests.factories import PASSWORD, auth, make_project, make_prompt, make_token, make_user

ALLOWED = "allowed"
"""Past the access check: any answer but 401/403, a 5xx or the login page (the outcome then
depends on the data: 200, 201, 204, 303, 404, 409, 422 …)."""
LOGIN = "login"
"""303 to ``/login?next=<this page>``."""
ROLES = ("anon", "annotator", "other", "admin")


@dataclass(frozen=True)
class Access:
    anon: int | str
    annotator: int | str
    other: int | str
    admin: int | str


PUBLIC = Access(200, 200, 200, 200)
API_ADMIN = Access(401, 403, 403, ALLOWED)
API_OWN_LEASE = Access(401, ALLOWED, 403, 403)  # only the lease's holder, not even an admin
PAGE_ADMIN_GET = Access(LOGIN, 403, 403, 200)
PAGE_ADMIN_POST = Access(LOGIN, 403, 403, ALLOWED)

EXPECTED: dict[tuple[str, str], Access] = {
    # public
    ("GET", "/"): Access(307, 307, 307, 307),  # → /label
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,  # the API's description; no data
    ("GET", "/docs"): PUBLIC,  # Swagger UI (vendored); no data
    ("GET", "/login"): Access(200, 303, 303, 303),  # logged in: on to ?next
    ("POST", "/login"): Access(401, 401, 401, 401),  # anyone may try (no credentials: 401)
    ("POST", "/logout"): Access(303, 303, 303, 303),  # → /login
    ("POST", "/lang"): Access(303, 303, 303, 303),
    # operations (admin bearer token)
    ("GET", "/metrics"): Access(401, 403, 403, 200),
    # annotator pages
    ("GET", "/label"): Access(LOGIN, 200, 200, 200),
    ("GET", "/label/{slug}"): Access(LOGIN, 200, 403, 200),  # members-only project
    # labeling API
    ("GET", "/api/v1/projects/{slug}/tasks/next"): Access(401, 200, 403, ALLOWED),
    ("POST", "/api/v1/leases/{lease_id}/submit"): API_OWN_LEASE,
    ("POST", "/api/v1/leases/{lease_id}/skip"): API_OWN_LEASE,
    ("POST", "/api/v1/leases/{lease_id}/extend"): API_OWN_LEASE,
    # admin API
    ("GET", "/api/v1/projects/{slug}/members"): API_ADMIN,
    ("POST", "/api/v1/projects/{slug}/members"): API_ADMIN,
    ("DELETE", "/api/v1/projects/{slug}/members"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}/export"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}/stats"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}/stats.csv"): API_ADMIN,
    ("POST", "/api/v1/projects"): API_ADMIN,
    ("GET", "/api/v1/projects"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}"): API_ADMIN,
    ("PATCH", "/api/v1/projects/{slug}"): API_ADMIN,
    ("POST", "/api/v1/projects/{slug}/prompts"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}/prompts"): API_ADMIN,
    ("GET", "/api/v1/prompts/{prompt_id}"): API_ADMIN,
    ("POST", "/api/v1/users"): API_ADMIN,
    ("GET", "/api/v1/users"): API_ADMIN,
    ("PATCH", "/api/v1/users/{username}"): API_ADMIN,
    ("GET", "/api/v1/users/{username}/tokens"): API_ADMIN,
    ("POST", "/api/v1/users/{username}/tokens"): API_ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): API_ADMIN,  # even the token's owner
    ("POST", "/api/v1/projects/{slug}/generate"): API_ADMIN,
    ("GET", "/api/v1/projects/{slug}/jobs"): API_ADMIN,
    ("GET", "/api/v1/jobs/{job_id}"): API_ADMIN,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): API_ADMIN,
    ("GET", "/api/v1/audit"): API_ADMIN,
    # admin pages
    ("GET", "/admin"): PAGE_ADMIN_GET,
    ("POST", "/admin/jobs/{job_id}/cancel"): PAGE_ADMIN_POST,
    ("GET", "/admin/new-project"): PAGE_ADMIN_GET,
    ("POST", "/admin/new-project"): PAGE_ADMIN_POST,
    ("GET", "/admin/projects/{slug}"): PAGE_ADMIN_GET,
    ("POST", "/admin/projects/{slug}"): PAGE_ADMIN_POST,
    ("POST", "/admin/projects/{slug}/import"): PAGE_ADMIN_POST,
    ("POST", "/admin/projects/{slug}/members"): PAGE_ADMIN_POST,
    ("GET", "/admin/projects/{slug}/dashboard"): PAGE_ADMIN_GET,
    ("GET", "/admin/projects/{slug}/prompts"): PAGE_ADMIN_GET,
    ("GET", "/admin/projects/{slug}/prompts/{prompt_id}"): PAGE_ADMIN_GET,
    ("GET", "/admin/users"): PAGE_ADMIN_GET,
    ("POST", "/admin/users"): PAGE_ADMIN_POST,
    ("GET", "/admin/users/{username}"): PAGE_ADMIN_GET,
    ("POST", "/admin/users/{username}/active"): PAGE_ADMIN_POST,
    ("POST", "/admin/users/{username}/tokens"): PAGE_ADMIN_POST,
    ("POST", "/admin/users/{username}/tokens/{token_id}/revoke"): PAGE_ADMIN_POST,
    ("GET", "/admin/audit"): PAGE_ADMIN_GET,
}

NOT_ROUTES = {"/static"}
"""Mounts left out of the table: ``/static`` serves the same public files to everyone."""

# Well-formed bodies, so that access is what a call exercises (the labeling routes validate
# the body before they check a bearer token).
BODIES = {
    "/api/v1/leases/{lease_id}/submit": {"ranking": [[1]]},
    "/api/v1/users/{username}": {"active": True},
}


def _routes(routes):
    for route in routes:
        included = getattr(route, "original_router", None)  # include_router() (no prefix here)
        yield from _routes(included.routes) if included is not None else (route,)


def all_routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the app answers, HEAD (implied by GET) aside."""
    found = set()
    for route in _routes(app.routes):
        path = getattr(route, "path", "")
        if path in NOT_ROUTES:
            continue
        methods = getattr(route, "methods", None)
        assert methods, f"unexpected route without methods: {route!r}"
        found |= {(method, path) for method in methods if method != "HEAD"}
    return found


def is_api(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


# --------------------------------------------------------------------------- helpers


def web_login(app, session: Session, user: User | None) -> tuple[TestClient, str]:
    """A client logged in as ``user`` (a session row made directly: no argon2), and the CSRF
    token its forms carry; ``None``: an anonymous client with its pre-login form token."""
    client = TestClient(app)
    if user is None:
        return client, form_token(client.get("/login").text)
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            token_hash=hash_token(secret),
            user_id=user.id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
    )
    session.commit()
    client.cookies.set(WEB_SESSION_COOKIE, secret)
    return client, csrf


IGNORED_COLUMNS = {("api_token", "last_used_at")}


def db_state(session: Session) -> dict[str, list[tuple]]:
    """Every row of every table (to show that a refused call wrote nothing)."""
    state = {}
    for table in Base.metadata.sorted_tables:
        cols = [c for c in table.columns if (table.name, c.name) not in IGNORED_COLUMNS]
        rows = session.execute(select(*cols)).all()
        state[table.name] = sorted(tuple(map(repr, row)) for row in rows)
    return state


@dataclass
class World:
    project_slug: str
    prompt_id: int
    ann: User
    other: User
    admin: User
    ann_token_id: int
    lease_id: int


def make_world(session: Session) -> World:
    project = make_project(session, members_only=True)
    prompt = make_prompt(session, project)
    make_prompt(session, project)
    admin = make_user(session, role=Role.admin)
    ann = make_user(session)
    other = make_user(session)
    session.add(ProjectMember(project_id=project.id, user_id=ann.id))
    session.commit()
    make_token(session, ann, name="ann-token")
    token_id = session.scalar(select(ApiToken.id).where(ApiToken.user_id == ann.id))
    task = tasks.next_task(session, slug=project.slug, user=ann)
    assert task is not None
    return World(project.slug, prompt.id, ann, other, admin, token_id, task.lease_id)


def url_of(path: str, world: World) -> str:
    values = {
        "slug": world.project_slug,
        "prompt_id": str(world.prompt_id),
        "username": world.ann.username,
        "token_id": str(world.ann_token_id),
        "job_id": "1",
        "lease_id": str(world.lease_id),
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def check(expected: int | str, r, url: str) -> None:
    where = f"{r.request.method} {url} → {r.status_code}: {r.text[:300]}"
    if expected == ALLOWED:
        assert r.status_code not in (401, 403), where
        assert r.status_code < 500, where
        assert not r.headers.get("location", "").startswith("/login?"), where
    elif expected == LOGIN:
        assert r.status_code == 303, where
        assert r.headers["location"].startswith("/login?next=/"), where
    else:
        assert r.status_code == expected, where
    if r.status_code == 401 and is_api(r.request.url.path):
        assert r.headers["www-authenticate"] == "Bearer", where


RECORDS_REFUSALS = {("POST", "/login")}
"""Routes whose refusals write: a failed login is counted for the rate limit."""


def refused(expected: int | str, route: tuple[str, str]) -> bool:
    return expected in (401, 403, LOGIN) and route not in RECORDS_REFUSALS


# --------------------------------------------------------------------------- the matrix


def test_table_covers_every_route(app):
    routes = all_routes(app)
    assert sorted(routes - set(EXPECTED)) == [], "routes missing from EXPECTED"
    assert sorted(set(EXPECTED) - routes) == [], "EXPECTED names routes that do not exist"


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_access(app, client, session, method, path):
    if (method, path) not in all_routes(app):
        pytest.fail(f"{method} {path} is in EXPECTED but the app has no such route")
    world = make_world(session)
    url = url_of(path, world)
    access = EXPECTED[(method, path)]
    users = {"anon": None, "annotator": world.ann, "other": world.other, "admin": world.admin}

    for role in ROLES:
        expected = getattr(access, role)
        user = users[role]
        before = db_state(session) if refused(expected, (method, path)) else None
        if is_api(path):
            headers = auth(make_token(session, user)) if user is not None else {}
            if before is not None:
                before = db_state(session)  # after the token was made
            body = {"json": BODIES.get(path, {})} if method != "GET" else {}
            r = client.request(method, url, headers=headers, follow_redirects=False, **body)
        else:
            web, csrf = web_login(app, session, user)
            if before is not None:
                before = db_state(session)
            data = {"data": {"csrf_token": csrf}} if method == "POST" else {}
            r = web.request(method, url, follow_redirects=False, **data)
            if r.status_code == 403:
                assert "The form has expired" not in r.text, "the CSRF token was refused"
        check(expected, r, url)
        if before is not None:
            assert db_state(session) == before, f"{role}: {method} {url} was refused but wrote"

    if is_api(path):  # a token that does not exist is no one
        body = {"json": BODIES.get(path, {})} if method != "GET" else {}
        r = client.request(method, url, headers=auth("pf_not-a-token"), **body)
        assert r.status_code == 401, r.text


def test_members_only_project_hidden_from_non_members(app, session):
    world = make_world(session)
    other, _ = web_login(app, session, world.other)
    ann, _ = web_login(app, session, world.ann)
    assert f"/label/{world.project_slug}" not in other.get("/label").text
    assert f"/label/{world.project_slug}" in ann.get("/label").text


# --------------------------------------------------------------------------- revocation


def test_revoked_token_fails_on_the_next_request(client, session):
    admin = make_user(session, role=Role.admin)
    admin_token = make_token(session, admin)
    user = make_user(session)
    token = make_token(session, user)
    project = make_project(session)
    make_prompt(session, project)
    url = f"/api/v1/projects/{project.slug}/tasks/next"
    assert client.get(url, headers=auth(token)).status_code == 200
    token_id = session.scalar(select(ApiToken.id).where(ApiToken.user_id == user.id))

    r = client.delete(f"/api/v1/tokens/{token_id}", headers=auth(admin_token))
    assert r.status_code in (200, 204), r.text
    r = client.get(url, headers=auth(token))
    assert r.status_code == 401, r.text
    assert r.json()["detail"] == "token revoked"


def test_token_revoked_on_the_admin_page_fails_at_once(app, client, session):
    admin = make_user(session, role=Role.admin)
    user = make_user(session)
    token = make_token(session, user)
    token_id = session.scalar(select(ApiToken.id).where(ApiToken.user_id == user.id))
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(token)).status_code == 404
    web, csrf = web_login(app, session, admin)
    r = web.post(
        f"/admin/users/{user.username}/tokens/{token_id}/revoke",
        data={"csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(token)).status_code == 401


@pytest.mark.parametrize("how", ["api", "page"])
def test_deactivated_user_loses_sessions_and_tokens_at_once(app, client, session, how):
    admin = make_user(session, role=Role.admin)
    user = make_user(session)
    token = make_token(session, user)
    project = make_project(session)
    make_prompt(session, project)
    browser, csrf = web_login(app, session, user)
    assert browser.get("/label", follow_redirects=False).status_code == 200
    assert browser.get(f"/api/v1/projects/{project.slug}/tasks/next").status_code == 200

    if how == "api":
        r = client.patch(
            f"/api/v1/users/{user.username}",
            json={"active": False},
            headers=auth(make_token(session, admin)),
        )
        assert r.status_code == 200, r.text
    else:
        web, admin_csrf = web_login(app, session, admin)
        r = web.post(
            f"/admin/users/{user.username}/active",
            data={"csrf_token": admin_csrf, "active": "0"},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text

    r = browser.get("/label", follow_redirects=False)  # the page: back to the login page
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=/label")
    r = browser.get(f"/api/v1/projects/{project.slug}/tasks/next")  # the API with the cookie
    assert r.status_code == 401, r.text
    r = browser.post(
        f"/api/v1/leases/{1}/skip", json={}, headers={CSRF_HEADER: csrf}
    )  # a write with the right CSRF header
    assert r.status_code == 401, r.text
    r = client.get(f"/api/v1/projects/{project.slug}/tasks/next", headers=auth(token))
    assert r.status_code == 401, r.text
    assert r.json()["detail"] == "account deactivated"


def test_logout_ends_the_session_server_side(app, session):
    user = make_user(session)
    browser, csrf = web_login(app, session, user)
    cookie = browser.cookies[WEB_SESSION_COOKIE]
    assert browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).is_redirect
    replay = TestClient(app)  # the old cookie, replayed (e.g. stolen before the logout)
    replay.cookies.set(WEB_SESSION_COOKIE, cookie)
    assert replay.get("/label", follow_redirects=False).headers["location"].startswith("/login")
    assert replay.get("/api/v1/projects/x/tasks/next").status_code == 401


# --------------------------------------------------------------------------- enumeration


class CountingHasher:
    """Wraps the argon2 hasher, counting ``verify`` calls."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.verified: list[str] = []

    def verify(self, password_hash, password):
        self.verified.append(password_hash)
        return self.inner.verify(password_hash, password)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_no_username_enumeration_on_login(app, session, monkeypatch):
    import app.security as security

    counting = CountingHasher(security._hasher)
    monkeypatch.setattr(security, "_hasher", counting)
    known = make_user(session)
    inactive = make_user(session, active=False)
    client = TestClient(app)
    token = form_token(client.get("/login").text)

    def attempt(username: str, password: str):
        counting.verified.clear()
        r = client.post(
            "/login",
            data={"username": username, "password": password, "csrf_token": token, "next": "/x"},
            follow_redirects=False,
        )
        return r, list(counting.verified)

    wrong, wrong_calls = attempt(known.username, "not the password")
    unknown, unknown_calls = attempt("nobody-" + known.username, "not the password")
    deactivated, inactive_calls = attempt(inactive.username, PASSWORD)

    assert wrong.status_code == unknown.status_code == deactivated.status_code == 401
    # Same page but for the username echoed back into the form.
    assert wrong.text.replace(known.username, "U") == unknown.text.replace(
        "nobody-" + known.username, "U"
    )
    assert wrong.text.replace(known.username, "U") == deactivated.text.replace(
        inactive.username, "U"
    )
    assert set(wrong.headers) == set(unknown.headers) == set(deactivated.headers)
    assert "set-cookie" not in wrong.headers
    assert "set-cookie" not in unknown.headers
    # One argon2 verification each: against the real hash, or a dummy one for no such user.
    assert len(wrong_calls) == len(unknown_calls) == len(inactive_calls) == 1
    assert unknown_calls[0] == security._DUMMY_HASH
    assert wrong_calls[0] == inactive_calls[0] != security._DUMMY_HASH
    assert unknown_calls[0].split("$")[:4] == wrong_calls[0].split("$")[:4]  # same parameters
