"""GET /api/v1/audit: each admin API call leaves exactly one event naming the calling admin (and
a rejected one none), keyset pages with a capped limit, filters, admins only."""

from __future__ import annotations

import orjson
import pytest

from app.models import AuditEvent, Role
from app.services.projects import get_project
from tests.factories import auth, count, make_prompt, make_token, make_user

PROMPT_TEXT = "Summarise the confidential merger memo"


@pytest.fixture
def admin(session):
    user = make_user(session, role=Role.admin, username="boss")
    return user, auth(make_token(session, user))


def audit(client, h, **params):
    r = client.get("/api/v1/audit", params=params, headers=h)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_admin_api_call_is_in_the_log_once(client, session, admin):
    boss, h = admin
    record = {
        "id": "p1",
        "prompt": PROMPT_TEXT,
        "completions": [{"id": "a", "text": "A"}, {"id": "b", "text": "B"}],
    }
    made: dict[str, int] = {}
    calls = [  # method, url, request, expected status, action, target
        ("POST", "/api/v1/projects", {"json": {"slug": "aud", "name": "A"}}, 201,
         "project.create", "aud"),
        ("PATCH", "/api/v1/projects/aud", {"json": {"overlap": 2}}, 200, "project.update", "aud"),
        ("POST", "/api/v1/users", {"json": {"username": "ann", "password": "long enough pw"}},
         201, "user.create", "ann"),
        ("POST", "/api/v1/projects/aud/members", {"json": {"usernames": ["ann"]}}, 200,
         "member.add", "aud"),
        ("DELETE", "/api/v1/projects/aud/members", {"json": {"usernames": ["ann"]}}, 200,
         "member.remove", "aud"),
        ("POST", "/api/v1/projects/aud/prompts", {"content": orjson.dumps(record)}, 201,
         "prompts.import", "aud"),
        ("POST", "/api/v1/projects/aud/generate", {"json": {"model": "fake", "k": 2}}, 202,
         "job.create", "aud"),
        ("POST", "/api/v1/jobs/{job}/cancel", {}, 200, "job.cancel", "aud"),
        ("GET", "/api/v1/projects/aud/export?format=pairs&ties=keep", {}, 200,
         "project.export", "aud"),
        ("POST", "/api/v1/users/ann/tokens", {"json": {"name": "ci"}}, 201, "token.create", "ann"),
        ("DELETE", "/api/v1/tokens/{token}", {}, 204, "token.revoke", "ann"),
        ("PATCH", "/api/v1/users/ann", {"json": {"active": False}}, 200, "user.deactivate", "ann"),
        ("PATCH", "/api/v1/users/ann", {"json": {"active": True}}, 200, "user.activate", "ann"),
    ]  # fmt: skip
    secret = None
    for method, url, request, expected, action, _ in calls:
        before = count(session, AuditEvent)
        r = client.request(method, url.format(**made), headers=h, **request)
        assert r.status_code == expected, r.text
        assert count(session, AuditEvent) == before + 1, action
        if action == "job.create":
            made["job"] = r.json()["id"]
        elif action == "token.create":
            made["token"], secret = r.json()["id"], r.json()["token"]

    page = audit(client, h, limit=100)
    got = [(e["action"], e["target_label"]) for e in reversed(page["items"])]
    assert got == [(action, target) for *_, action, target in calls]
    assert {(e["actor"], e["actor_id"]) for e in page["items"]} == {("boss", boss.id)}
    (export,) = [e for e in page["items"] if e["action"] == "project.export"]
    assert export["details"]["ties"] == "keep"
    assert export["details"]["format"] == "pairs"
    body = orjson.dumps(page).decode()
    assert secret is not None
    assert secret not in body
    assert "long enough pw" not in body
    assert PROMPT_TEXT not in body


def test_rejected_calls_leave_no_event(client, session, admin):
    _, h = admin
    client.post("/api/v1/projects", json={"slug": "aud", "name": "A"}, headers=h)
    before = count(session, AuditEvent)
    rejected = [
        ("POST", "/api/v1/projects/aud/prompts", {"content": b'{"id": "p1"}\n'}, 422),
        ("POST", "/api/v1/projects/aud/prompts", {"content": b"not json"}, 422),
        ("POST", "/api/v1/projects", {"json": {"slug": "aud", "name": "again"}}, 409),
        ("PATCH", "/api/v1/projects/aud", {"json": {"overlap": 0}}, 422),
        ("POST", "/api/v1/projects/aud/members", {"json": {"usernames": ["ghost"]}}, 422),
        ("POST", "/api/v1/projects/aud/generate", {"json": {"model": "fake"}}, 422),
        ("GET", "/api/v1/projects/aud/export?format=hh&ties=keep", {}, 422),
        ("GET", "/api/v1/projects/nope/export", {}, 404),
        ("PATCH", "/api/v1/users/boss", {"json": {"active": False}}, 409),
        ("DELETE", "/api/v1/tokens/999999", {}, 404),
    ]
    for method, url, kwargs, expected in rejected:
        r = client.request(method, url, headers=h, **kwargs)
        assert r.status_code == expected, (url, r.text)
    assert count(session, AuditEvent) == before


def test_keyset_pagination_and_the_limit_cap(client, session, admin):
    _, h = admin
    for i in range(7):
        r = client.post("/api/v1/users", json={"username": f"u{i}"}, headers=h)
        assert r.status_code == 201
    ids, after, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"after": after} if after else {})
        page = audit(client, h, **params)
        pages += 1
        ids += [e["id"] for e in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert pages == 3
    assert len(ids) == len(set(ids)) == 7
    assert ids == sorted(ids, reverse=True)
    for bad in (
        {"limit": 0},
        {"limit": 501},
        {"after": "x"},
        {"after": str(2**63)},
        {"action": "user.delete"},
        {"target_type": "prompt"},
        {"since": "yesterday"},
        {"actor": "a" * 65},
        {"actor": "\x00"},
        {"since": "9999-12-31T23:59:59-23:59"},
    ):
        r = client.get("/api/v1/audit", params=bad, headers=h)
        assert r.status_code == 422, bad
        assert r.json()["detail"]


def test_filters(client, session, admin):
    _, h = admin
    other = make_user(session, role=Role.admin, username="deputy")
    h2 = auth(make_token(session, other))
    client.post("/api/v1/projects", json={"slug": "one", "name": "1"}, headers=h)
    client.post("/api/v1/projects", json={"slug": "two", "name": "2"}, headers=h2)
    client.post("/api/v1/users", json={"username": "ann"}, headers=h2)
    client.post("/api/v1/users/ann/tokens", json={}, headers=h2)
    make_prompt(session, get_project(session, slug="one"))
    client.post("/api/v1/projects/one/generate", json={"model": "fake"}, headers=h)

    def got(**params):
        items = audit(client, h, **params)["items"]
        return [(e["actor"], e["action"], e["target_label"]) for e in items]

    assert got(actor="deputy") == [
        ("deputy", "token.create", "ann"),
        ("deputy", "user.create", "ann"),
        ("deputy", "project.create", "two"),
    ]
    assert got(action="project.create") == [
        ("deputy", "project.create", "two"),
        ("boss", "project.create", "one"),
    ]
    assert got(action="job") == [("boss", "job.create", "one")]
    assert got(target_type="user") == got(target="ann")
    assert len(got(target_type="user")) == 2
    assert got(target="one", action="project") == [("boss", "project.create", "one")]
    assert len(got(since="2000-01-01T00:00:00")) == 5
    assert got(since="2999-01-01") == []
    assert got(actor="nobody") == []


def test_admins_only(client, session):
    annotator = make_user(session)
    assert client.get("/api/v1/audit").status_code == 401
    r = client.get("/api/v1/audit", headers=auth(make_token(session, annotator)))
    assert r.status_code == 403


def test_the_log_has_no_write_api(app):
    methods = {
        m
        for path, ops in app.openapi()["paths"].items()
        if path.startswith("/api/v1/audit")
        for m in ops
    }
    assert methods == {"get"}
