"""Every /api/v1 route × {anonymous, annotator, admin}.

The expected access of each route is listed here; the test fails when a route exists that the
table does not cover, so a new route cannot ship without a decision about who may call it.
"""

from __future__ import annotations

import re

import pytest

from app.models import Role
from tests.factories import auth, make_project, make_prompt, make_token, make_user

ADMIN = "admin"
ANY_USER = "any user"
EXPECTED_ACCESS = {
    ("GET", "/api/v1/projects/{slug}/tasks/next"): ANY_USER,
    ("POST", "/api/v1/leases/{lease_id}/submit"): ANY_USER,
    ("POST", "/api/v1/leases/{lease_id}/skip"): ANY_USER,
    ("POST", "/api/v1/leases/{lease_id}/extend"): ANY_USER,
    ("GET", "/api/v1/projects/{slug}/members"): ADMIN,
    ("POST", "/api/v1/projects/{slug}/members"): ADMIN,
    ("DELETE", "/api/v1/projects/{slug}/members"): ADMIN,
    ("GET", "/api/v1/projects/{slug}/export"): ADMIN,
    ("GET", "/api/v1/projects/{slug}/stats"): ADMIN,
    ("GET", "/api/v1/projects/{slug}/stats.csv"): ADMIN,
    ("POST", "/api/v1/projects"): ADMIN,
    ("GET", "/api/v1/projects"): ADMIN,
    ("GET", "/api/v1/projects/{slug}"): ADMIN,
    ("PATCH", "/api/v1/projects/{slug}"): ADMIN,
    ("POST", "/api/v1/projects/{slug}/prompts"): ADMIN,
    ("GET", "/api/v1/projects/{slug}/prompts"): ADMIN,
    ("GET", "/api/v1/prompts/{prompt_id}"): ADMIN,
    ("POST", "/api/v1/users"): ADMIN,
    ("GET", "/api/v1/users"): ADMIN,
    ("PATCH", "/api/v1/users/{username}"): ADMIN,
    ("GET", "/api/v1/users/{username}/tokens"): ADMIN,
    ("POST", "/api/v1/users/{username}/tokens"): ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): ADMIN,
    ("POST", "/api/v1/projects/{slug}/generate"): ADMIN,
    ("GET", "/api/v1/projects/{slug}/jobs"): ADMIN,
    ("GET", "/api/v1/jobs/{job_id}"): ADMIN,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): ADMIN,
}


# The labeling routes check the token inside the endpoint (one thread hop), after the body
# is validated: they get a well-formed body so that a bad token is what the test exercises.
# (Anonymous callers get 401 before any body validation.)
BODIES = {
    "/api/v1/leases/{lease_id}/submit": {"ranking": [[1]]},
    "/api/v1/users/{username}": {"active": True},
}


def api_routes(app) -> set[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return {
        (method.upper(), path)
        for path, ops in paths.items()
        if path.startswith("/api/v1")
        for method in ops
    }


def test_table_covers_every_route(app):
    assert api_routes(app) == set(EXPECTED_ACCESS)


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED_ACCESS))
def test_access(client, session, method, path):
    project = make_project(session)
    prompt = make_prompt(session, project)
    admin = make_user(session, role=Role.admin)
    annotator = make_user(session, role=Role.annotator)
    url = re.sub(
        r"\{(\w+)\}",
        lambda m: {
            "slug": project.slug,
            "prompt_id": str(prompt.id),
            "username": annotator.username,
            "token_id": "1",
            "job_id": "1",
            "lease_id": "1",
        }[m.group(1)],
        path,
    )
    body = {"json": BODIES.get(path, {})} if method in {"POST", "PATCH", "DELETE"} else {}

    anonymous = client.request(method, url, **body)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer"

    bad_token = client.request(method, url, headers=auth("pf_not-a-token"), **body)
    assert bad_token.status_code == 401

    as_annotator = client.request(method, url, headers=auth(make_token(session, annotator)), **body)
    if EXPECTED_ACCESS[(method, path)] == ADMIN:
        assert as_annotator.status_code == 403, as_annotator.text
    else:
        assert as_annotator.status_code not in (401, 403), as_annotator.text
        assert as_annotator.status_code < 500, as_annotator.text

    as_admin = client.request(method, url, headers=auth(make_token(session, admin)), **body)
    assert as_admin.status_code not in (401, 403), as_admin.text
    assert as_admin.status_code < 500, as_admin.text


# --------------------------------------------------------------------------- admin pages

ADMIN_PAGES = {
    ("GET", "/admin"),
    ("POST", "/admin/jobs/{job_id}/cancel"),
    ("GET", "/admin/new-project"),
    ("POST", "/admin/new-project"),
    ("GET", "/admin/projects/{slug}"),
    ("POST", "/admin/projects/{slug}"),
    ("POST", "/admin/projects/{slug}/import"),
    ("POST", "/admin/projects/{slug}/members"),
    ("GET", "/admin/projects/{slug}/dashboard"),  # app/routes/pages_dashboard.py
    ("GET", "/admin/projects/{slug}/prompts"),
    ("GET", "/admin/projects/{slug}/prompts/{prompt_id}"),
    ("GET", "/admin/users"),
    ("POST", "/admin/users"),
    ("GET", "/admin/users/{username}"),
    ("POST", "/admin/users/{username}/active"),
    ("POST", "/admin/users/{username}/tokens"),
    ("POST", "/admin/users/{username}/tokens/{token_id}/revoke"),
}
"""Every /admin page route (HTML): anonymous visitors are sent to the login page, annotators
get the 403 page, admins get the page (GET) or, for a form without its CSRF token, the 403
"form has expired" page (POST)."""


def _routes(routes):
    for route in routes:
        included = getattr(route, "original_router", None)  # include_router() (no prefix here)
        yield from _routes(included.routes) if included is not None else (route,)


def admin_page_routes(app) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in _routes(app.routes)
        if getattr(route, "path", "").startswith("/admin")
        for method in getattr(route, "methods", ()) or ()
        if method != "HEAD"
    }


def test_admin_page_table_covers_every_route(app):
    assert admin_page_routes(app) == ADMIN_PAGES


@pytest.mark.parametrize(("method", "path"), sorted(ADMIN_PAGES))
def test_admin_page_access(app, client, session, method, path):
    from fastapi.testclient import TestClient

    from tests.app.test_pages import log_in

    project = make_project(session)
    prompt = make_prompt(session, project)
    admin = make_user(session, role=Role.admin)
    annotator = make_user(session, role=Role.annotator)
    url = re.sub(
        r"\{(\w+)\}",
        lambda m: {
            "slug": project.slug,
            "prompt_id": str(prompt.id),
            "username": annotator.username,
            "token_id": "1",
            "job_id": "1",
        }[m.group(1)],
        path,
    )

    anonymous = client.request(method, url, follow_redirects=False)
    assert anonymous.status_code == 303, anonymous.text
    assert anonymous.headers["location"].startswith("/login?next=/admin")

    as_annotator = TestClient(app)
    assert log_in(as_annotator, annotator.username).status_code == 303
    r = as_annotator.request(method, url, data={}, follow_redirects=False)
    assert r.status_code == 403, r.text
    assert "Administrators only" in r.text

    as_admin = TestClient(app)
    assert log_in(as_admin, admin.username).status_code == 303
    r = as_admin.request(method, url, data={}, follow_redirects=False)
    if method == "GET":
        assert r.status_code == 200, r.text
    else:  # no CSRF token: refused before anything else happens
        assert r.status_code == 403, r.text
        assert "The form has expired" in r.text
    assert r.headers["content-type"].startswith("text/html")
