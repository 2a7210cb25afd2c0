"""Limits, each answered with a clear 4xx JSON error:

- request bodies over ``PREFERO_MAX_REQUEST_BYTES`` get 413 on every route but the imports,
  whether announced by ``Content-Length`` or only streamed (chunked), on JSON API routes and on
  HTML forms alike; the import routes accept bodies up to ``PREFERO_MAX_IMPORT_BYTES``;
- every list endpoint caps ``limit`` (above the cap: 422) and pages with ``offset``/cursors;
- an annotator holding ``PREFERO_MAX_OPEN_LEASES`` live leases (all projects) gets 429 with
  ``Retry-After`` for a new task, while resuming a held task still works;
- failed logins are rate limited with 429 and ``Retry-After``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.deps import MAX_PAGE
from app.main import create_app
from app.models import Role
from tests.factories import (
    PASSWORD,
    auth,
    make_project,
    make_prompt,
    make_token,
    make_user,
    use_session,
)

BODY_LIMIT = 4096


@pytest.fixture
def small(settings, session) -> Iterator[TestClient]:
    """A client of an app with a 4 KiB body limit and at most 2 open leases per user."""
    app = create_app(
        settings.model_copy(update={"max_request_bytes": BODY_LIMIT, "max_open_leases": 2})
    )
    use_session(app, session)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


# --------------------------------------------------------------------------- body size


def test_declared_large_body_gets_413(small, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    r = small.post(
        "/api/v1/projects",
        content=b"{" + b" " * BODY_LIMIT + b"}",
        headers={**admin, "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json() == {
        "detail": f"the request body is larger than the limit of {BODY_LIMIT} bytes"
    }
    assert r.headers["x-request-id"]


def test_streamed_large_body_without_length_gets_413(small, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    r = small.post(
        "/api/v1/projects",
        content=_chunks(BODY_LIMIT * 3),  # chunked: no Content-Length
        headers={**admin, "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert "larger than the limit" in r.json()["detail"]


def test_labeling_routes_are_limited_too(small, session):
    """The hot path (auth inside the endpoint) is cut at the limit as well."""
    user = make_user(session)
    token = make_token(session, user)
    r = small.post(
        "/api/v1/leases/1/submit",
        content=_chunks(BODY_LIMIT * 2),
        headers={**auth(token), "content-type": "application/json"},
    )
    assert r.status_code == 413


def test_html_form_over_the_limit_gets_413(small):
    r = small.post(
        "/login",
        content=_chunks(BODY_LIMIT * 2),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 413


def test_small_bodies_pass(small, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    r = small.post("/api/v1/projects", json={"slug": "ok-1", "name": "OK"}, headers=admin)
    assert r.status_code == 201


def test_imports_keep_their_own_larger_limit(small, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    project = make_project(session, completions_per_task=2)
    lines = [
        json.dumps({"prompt": f"p{i} {'x' * 100}", "completions": ["a", "b"]}) for i in range(100)
    ]
    body = ("\n".join(lines) + "\n").encode()
    assert len(body) > BODY_LIMIT * 3
    r = small.post(
        f"/api/v1/projects/{project.slug}/prompts",
        content=body,
        headers={**admin, "content-type": "application/x-ndjson"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 100


# --------------------------------------------------------------------------- pagination


LISTS = [
    "/api/v1/projects",
    "/api/v1/users",
    "/api/v1/users/{username}/tokens",
    "/api/v1/projects/{slug}/members",
    "/api/v1/projects/{slug}/jobs",
    "/api/v1/projects/{slug}/prompts",
]


@pytest.mark.parametrize("path", LISTS)
def test_every_list_caps_limit(client, session, path):
    admin_user = make_user(session, role=Role.admin)
    admin = auth(make_token(session, admin_user))
    project = make_project(session)
    url = path.format(username=admin_user.username, slug=project.slug)
    assert client.get(url, params={"limit": MAX_PAGE}, headers=admin).status_code == 200
    r = client.get(url, params={"limit": MAX_PAGE + 1}, headers=admin)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "query.limit"
    assert client.get(url, params={"limit": 0}, headers=admin).status_code == 422


def test_limit_and_offset_page_through_a_list(client, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    for _ in range(5):
        make_project(session)
    every = [p["slug"] for p in client.get("/api/v1/projects", headers=admin).json()]
    pages = [
        client.get("/api/v1/projects", params={"limit": 2, "offset": o}, headers=admin).json()
        for o in range(0, len(every), 2)
    ]
    assert [p["slug"] for page in pages for p in page] == every
    assert all(len(page) <= 2 for page in pages)


# --------------------------------------------------------------------------- lease cap


def test_lease_cap_across_projects_gives_429_with_retry_after(small, session):
    user = make_user(session)
    headers = auth(make_token(session, user))
    a = make_project(session, completions_per_task=2)
    b = make_project(session, completions_per_task=2)
    for project in (a, b):
        for _ in range(3):
            make_prompt(session, project, k=2)
    first = small.get(f"/api/v1/projects/{a.slug}/tasks/next", headers=headers)
    assert first.status_code == 200
    lease_a = first.json()["lease_id"]
    second = small.get(f"/api/v1/projects/{b.slug}/tasks/next", headers=headers)
    assert second.status_code == 200

    # A reload resumes the held task: no new lease, so no limit.
    again = small.get(f"/api/v1/projects/{a.slug}/tasks/next", headers=headers)
    assert again.status_code == 200
    assert again.json()["lease_id"] == lease_a

    # Prefetching a third task (2 held, cap 2) is refused.
    r = small.get(
        f"/api/v1/projects/{a.slug}/tasks/next", params={"exclude": lease_a}, headers=headers
    )
    assert r.status_code == 429
    assert "open tasks" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 601  # until the first lease expires

    # Submitting one frees a place.
    task = first.json()
    ranking = [[c["id"]] for c in task["completions"]]
    done = small.post(
        f"/api/v1/leases/{lease_a}/submit", json={"ranking": ranking}, headers=headers
    )
    assert done.status_code == 201
    assert small.get(f"/api/v1/projects/{a.slug}/tasks/next", headers=headers).status_code == 200


def test_other_users_are_not_limited_by_someone_elses_leases(small, session):
    project = make_project(session, completions_per_task=2)
    for _ in range(4):
        make_prompt(session, project, k=2)
    hoarder = auth(make_token(session, make_user(session)))
    other = auth(make_token(session, make_user(session)))
    held = []
    for _ in range(2):
        r = small.get(
            f"/api/v1/projects/{project.slug}/tasks/next",
            params=[("exclude", i) for i in held],
            headers=hoarder,
        )
        held.append(r.json()["lease_id"])
    assert (
        small.get(
            f"/api/v1/projects/{project.slug}/tasks/next",
            params=[("exclude", i) for i in held],
            headers=hoarder,
        ).status_code
        == 429
    )
    assert (
        small.get(f"/api/v1/projects/{project.slug}/tasks/next", headers=other).status_code == 200
    )


# --------------------------------------------------------------------------- logins


def test_failed_logins_are_rate_limited_with_retry_after(client, session, settings):
    user = make_user(session)
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    bad = {"username": user.username, "password": "not it", "csrf_token": token}
    statuses = [
        client.post("/login", data=bad).status_code for _ in range(settings.login_max_failures)
    ]
    assert set(statuses) == {401}
    r = client.post("/login", data={**bad, "password": PASSWORD})
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
