"""The admin audit log page, /admin/audit: the admin page forms are recorded with the admin who
sent them, the table escapes what admins typed, filters and pages keep each other, admins only
(on SQLite and PostgreSQL, through the ASGI app)."""

from __future__ import annotations

import json
import re
from html import unescape

from sqlalchemy import select

from app.models import AuditEvent, Role
from app.schemas import JobCreate, ProjectCreate
from app.services import generation, projects, users
from tests.app.test_pages import assert_no_inline_code, logged_in
from tests.app.test_pages_admin import page_csrf
from tests.app.test_pages_admin_projects import form_for, jsonl, record, upload
from tests.factories import make_prompt, make_user

XSS = '<script>alert("x")</script>'


def rows(html: str) -> list[dict[str, str]]:
    """The table's rows as {field: text}, newest first."""
    out = []
    for row in re.findall(r'<tr id="event-\d+".*?</tr>', html, re.S):
        cells = dict(re.findall(r'data-field="(\w+)">(.*?)</td>', row, re.S))
        out.append(
            {k: re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", v)).strip() for k, v in cells.items()}
        )
    return out


def test_admin_page_forms_are_recorded_with_the_admin(client, session):
    me = logged_in(client, session, role=Role.admin, username="chief")
    make_user(session, username="zoe")
    csrf = page_csrf(client.get("/admin/users").text)
    posts = [
        ("/admin/new-project", form_for(csrf, slug="paged")),
        ("/admin/projects/paged", form_for(csrf, slug="paged", overlap="4")),
        (
            "/admin/projects/paged/members",
            {"csrf_token": csrf, "action": "add", "usernames": "zoe"},
        ),
        ("/admin/users", {"csrf_token": csrf, "username": "newbie", "role": "annotator"}),
        ("/admin/users/newbie/active", {"csrf_token": csrf, "active": "0"}),
        ("/admin/users/newbie/tokens", {"csrf_token": csrf, "name": "robot"}),
    ]
    for url, data in posts:
        r = client.post(url, data=data, follow_redirects=False)
        assert r.status_code in (200, 303), (url, r.text)
    r = upload(client, "paged", csrf, jsonl(record(1)), follow_redirects=False)
    assert r.status_code == 303
    token = session.scalar(select(AuditEvent).where(AuditEvent.action == "token.create"))
    token_id = token.details["token_id"]
    r = client.post(
        f"/admin/users/newbie/tokens/{token_id}/revoke",
        data={"csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303
    job = generation.create_job(session, project_slug="paged", data=JobCreate(model="fake"))
    r = client.post(
        f"/admin/jobs/{job.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert r.status_code == 303

    session.expire_all()
    logged = [
        (e.actor, e.action, e.target_label)
        for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
    ]
    assert logged == [
        ("chief", "project.create", "paged"),
        ("chief", "project.update", "paged"),
        ("chief", "member.add", "paged"),
        ("chief", "user.create", "newbie"),
        ("chief", "user.deactivate", "newbie"),
        ("chief", "token.create", "newbie"),
        ("chief", "prompts.import", "paged"),
        ("chief", "token.revoke", "newbie"),
        ("cli", "job.create", "paged"),
        ("chief", "job.cancel", "paged"),
    ]
    events = session.scalars(select(AuditEvent))
    assert {e.actor_id for e in events if e.actor != "cli"} == {me.id}

    page = client.get("/admin/audit")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    shown = rows(page.text)
    assert [(r["actor"], r["target"]) for r in shown[:2]] == [
        ("chief", "Project paged"),
        ("cli", "Project paged"),
    ]
    assert shown[0]["action"] == "Generation job cancelled job.cancel"
    assert shown[-1]["action"] == "Project created project.create"


def test_what_admins_typed_is_escaped(client, session):
    admin = logged_in(client, session, role=Role.admin)
    projects.create_project(
        session, data=ProjectCreate(slug="xss", name=XSS, flags=[XSS]), actor=admin
    )
    users.create_token(session, username=admin.username, name=XSS, actor=admin)
    r = client.get("/admin/audit")
    assert r.status_code == 200
    assert_no_inline_code(r.text)
    assert "<script>alert" not in r.text
    assert r.text.count("&lt;script&gt;alert(") == 3  # project name, flag, token name
    token, project = (json.loads(unescape(r["details"])) for r in rows(r.text))
    assert token["name"] == XSS
    assert project["name"] == XSS


def test_filters_and_pages(client, session, monkeypatch):
    admin = logged_in(client, session, role=Role.admin, username="chief")
    for i in range(5):
        users.create_user(session, username=f"u{i}", role=Role.annotator, actor=admin)
    project = projects.create_project(session, data=ProjectCreate(slug="p", name="P"))
    make_prompt(session, project)
    generation.create_job(session, project_slug="p", data=JobCreate(model="fake"), actor=admin)
    monkeypatch.setattr("app.routes.pages_admin_audit.PAGE_SIZE", 2)

    page = client.get("/admin/audit", params={"action": "user", "actor": "chief"}).text
    assert [r["target"] for r in rows(page)] == ["User u4", "User u3"]
    assert 'value="chief"' in page
    assert '<option value="user" selected>' in page
    older = re.search(r'<a class="button" href="([^"]+)" rel="next">', page).group(1)
    assert unescape(older).startswith("/admin/audit?actor=chief&action=user&after=")
    page = client.get(unescape(older)).text
    assert [r["target"] for r in rows(page)] == ["User u2", "User u1"]
    assert 'href="/admin/audit?actor=chief&amp;action=user" rel="first"' in page

    page = client.get("/admin/audit", params={"actor": "cli"}).text
    assert [r["action"] for r in rows(page)] == ["Project created project.create"]
    page = client.get("/admin/audit", params={"target_type": "project", "target": "p"}).text
    assert len(rows(page)) == 2
    page = client.get("/admin/audit", params={"since": "2999-01-01"}).text
    assert rows(page) == []
    assert "No events match." in page

    r = client.get("/admin/audit", params={"since": "soon"})
    assert r.status_code == 422
    assert "not a date or time" in r.text
    r = client.get("/admin/audit", params={"action": "user.delete"})
    assert r.status_code == 422


def test_admins_only_and_linked_from_the_admin_nav(client, session):
    r = client.get("/admin/audit", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login")
    logged_in(client, session)
    r = client.get("/admin/audit")
    assert r.status_code == 403
    assert 'href="/admin/audit"' not in r.text
    client.cookies.clear()
    logged_in(client, session, role=Role.admin)
    page = client.get("/admin").text
    assert '<a href="/admin/audit">Audit log</a>' in page
    page = client.get("/admin/audit").text
    assert '<a href="/admin/audit" aria-current="page">Audit log</a>' in page
    page = client.get("/admin/audit", headers={"Accept-Language": "zh-CN"}).text
    assert "<h1>审计日志</h1>" in page
