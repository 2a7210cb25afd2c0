"""The admin page: access, the projects with their counts, the generation jobs with their
progress, cancelling (form and JSON API, both needing CSRF), escaping, headers and language
(on SQLite and PostgreSQL, through the ASGI app)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from app.models import GenerationJob, JobStatus, Role
from app.routes.pages_admin import JOB_LIMIT
from app.web import CONTENT_SECURITY_POLICY
from tests.app.test_pages import META_CSRF, _tags, assert_no_inline_code, logged_in
from tests.factories import make_annotation, make_project, make_prompt, make_user


def make_job(session, project, **fields) -> GenerationJob:
    values = {
        "project_id": project.id,
        "status": JobStatus.queued,
        "backend": "transformers",
        "models": ["smollm2-135m-instruct"],
        "k": 4,
        "total": 5,
        **fields,
    }
    job = GenerationJob(**values)
    session.add(job)
    session.commit()
    return job


def admin_client(client, session):
    return logged_in(client, session, role=Role.admin)


def page_csrf(html: str) -> str:
    match = META_CSRF.search(html)
    assert match
    return match.group(1)


def row_of(html: str, row_id: str) -> str:
    """The HTML of one table row, by its id."""
    match = re.search(rf'<tr id="{re.escape(row_id)}".*?</tr>', html, re.DOTALL)
    assert match, f"no row {row_id}"
    return match.group(0)


def cell(row: str, name: str) -> str:
    match = re.search(rf'data-field="{name}"[^>]*>([^<]*)<', row)
    assert match, f"no {name} field"
    return match.group(1).strip()


def db_job(session, job_id: int) -> GenerationJob:
    session.expire_all()
    job = session.scalar(select(GenerationJob).where(GenerationJob.id == job_id))
    assert job is not None
    return job


# --------------------------------------------------------------------------- access


def test_anonymous_visitors_are_sent_to_login(client, session):
    r = client.get("/admin", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/admin"
    job = make_job(session, make_project(session))
    r = client.post(f"/admin/jobs/{job.id}/cancel", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/admin"
    assert db_job(session, job.id).status == JobStatus.queued


def test_annotators_get_a_403_page_and_no_admin_link(client, session):
    job = make_job(session, make_project(session))
    logged_in(client, session)
    r = client.get("/admin")
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("text/html")
    assert "Administrators only" in r.text
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert 'href="/admin"' not in client.get("/label").text
    csrf = page_csrf(r.text)
    r = client.post(f"/admin/jobs/{job.id}/cancel", data={"csrf_token": csrf})
    assert r.status_code == 403
    r = client.post(f"/api/v1/jobs/{job.id}/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403
    assert db_job(session, job.id).status == JobStatus.queued


def test_admins_see_the_page_with_header_links_csp_and_no_inline_code(client, session):
    admin_client(client, session)
    r = client.get("/admin")
    assert r.status_code == 200
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert r.headers["cache-control"] == "no-store"
    assert_no_inline_code(r.text)
    assert '<a href="/admin" aria-current="page">Admin</a>' in r.text
    assert '<a href="/docs">API docs</a>' in r.text
    srcs = [a.get("src") or "" for t, a in _tags(r.text) if t == "script" and a.get("src")]
    assert len(srcs) == 1
    assert srcs[0].startswith("/static/js/admin.js?v=")
    # Elsewhere the link is there without aria-current.
    assert '<a href="/admin">Admin</a>' in client.get("/label").text
    js = client.get("/static/js/admin.js")
    assert js.status_code == 200
    assert "innerHTML" not in js.text


def test_an_empty_installation(client, session):
    admin_client(client, session)
    page = client.get("/admin").text
    assert "No projects yet." in page
    assert "No generation jobs yet." in page
    assert "0 workers online." in page


# --------------------------------------------------------------------------- content


def test_projects_are_listed_with_their_counts(client, session):
    project = make_project(session, name="Helpfulness")
    prompts = [make_prompt(session, project, k=4) for _ in range(3)]
    annotator = make_user(session)
    make_annotation(session, prompts[0], annotator)
    make_job(session, project, status=JobStatus.running, total=5, done=2)
    make_job(session, project, status=JobStatus.queued, total=3)
    make_job(session, project, status=JobStatus.succeeded, total=4, done=4)
    other = make_project(session, name="Harmlessness")
    admin_client(client, session)
    page = client.get("/admin").text
    row = row_of(page, f"project-{project.slug}")
    assert "Helpfulness" in row
    assert cell(row, "prompt_count") == "3"
    assert cell(row, "completion_count") == "12"
    assert cell(row, "annotation_count") == "1"
    assert cell(row, "pending_generation") == "6"  # 5 - 2 running + 3 queued
    assert f'<a href="/label/{project.slug}">Labeling page' in row
    row = row_of(page, f"project-{other.slug}")
    assert [cell(row, f) for f in ("prompt_count", "completion_count", "pending_generation")] == [
        "0",
        "0",
        "0",
    ]


def test_jobs_are_listed_newest_first_with_their_progress(client, session):
    project = make_project(session, name="Gen")
    started = datetime(2026, 11, 30, 14, 5, 9, tzinfo=UTC)
    done = make_job(
        session,
        project,
        status=JobStatus.failed,
        models=["a", "b"],
        k=2,
        total=4,
        done=4,
        completions_created=7,
        duplicates_dropped=1,
        errors=[{"prompt_id": 1, "message": "boom"}],
        worker="host:1",
        started_at=started,
        finished_at=datetime(2026, 11, 30, 14, 6, 0, tzinfo=UTC),
        message="1 prompts failed; first: boom",
    )
    running = make_job(session, project, status=JobStatus.running, total=5, done=2, worker="host:2")
    queued = make_job(session, project)
    admin_client(client, session)
    page = client.get("/admin").text
    order = [int(i) for i in re.findall(r'<tr id="job-(\d+)"', page)]
    mine = [i for i in order if i in {done.id, running.id, queued.id}]
    assert mine == [queued.id, running.id, done.id]

    row = row_of(page, f"job-{running.id}")
    assert f'data-project-slug="{project.slug}"' in row
    assert 'data-status="running"' in row
    assert cell(row, "status") == "Running"
    assert cell(row, "progress") == "2 / 5 prompts"
    assert f'<progress id="job-{running.id}-progress" max="5" value="2">' in row
    assert f'<label class="progress-label" for="job-{running.id}-progress"' in row
    assert cell(row, "worker") == "host:2"
    assert 'class="cancel-form">' in row  # not hidden
    assert f'aria-label="Cancel job {running.id}"' in row

    row = row_of(page, f"job-{done.id}")
    assert cell(row, "status") == "Failed"
    assert "a, b" in row
    assert cell(row, "progress") == "4 / 4 prompts"
    assert cell(row, "completions_created") == "7"
    assert cell(row, "duplicates_dropped") == "1"
    assert cell(row, "errors") == "1"
    assert cell(row, "started_at") == "2026-11-30 14:05:09"
    assert cell(row, "finished_at") == "2026-11-30 14:06:00"
    assert 'datetime="2026-11-30T14:05:09+00:00"' in row
    assert cell(row, "message") == "1 prompts failed; first: boom"
    assert 'class="cancel-form" hidden>' in row

    row = row_of(page, f"job-{queued.id}")
    assert cell(row, "status") == "Queued"
    assert cell(row, "worker") == "—"
    assert cell(row, "started_at") == "—"
    assert "No worker is running" in page  # a job is queued and no worker has a heartbeat

    config = json.loads(
        re.search(r'<script type="application/json" id="admin-config">(.*?)</script>', page)[1]
    )
    assert config["pollMs"] == 2000
    assert config["urls"]["projectJobs"] == "/api/v1/projects/{slug}/jobs"


def test_only_the_newest_jobs_and_every_unfinished_one_are_listed(client, session):
    project = make_project(session)
    old_running = make_job(session, project, status=JobStatus.running)
    old_finished = make_job(session, project, status=JobStatus.succeeded)
    newer = [make_job(session, project, status=JobStatus.cancelled) for _ in range(JOB_LIMIT)]
    admin_client(client, session)
    page = client.get("/admin").text
    assert all(f'id="job-{j.id}"' in page for j in newer)
    assert f'id="job-{old_running.id}"' in page
    assert f'id="job-{old_finished.id}"' not in page


def test_a_job_being_cancelled_shows_it(client, session):
    job = make_job(session, make_project(session), status=JobStatus.running, cancel_requested=True)
    admin_client(client, session)
    row = row_of(client.get("/admin").text, f"job-{job.id}")
    assert re.search(r'data-field="cancelling">', row)  # shown (not hidden)
    assert 'class="cancel-form" hidden>' in row


def test_names_and_messages_are_escaped(client, session):
    evil = "<script>alert(1)</script>"
    project = make_project(session, name=f"{evil}<img src=x onerror=alert(2)>")
    make_job(session, project, models=[evil], message=evil, worker=evil)
    admin_client(client, session)
    page = client.get("/admin").text
    assert "<script>alert" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # 2 names, model, worker, msg
    assert_no_inline_code(page)


def test_the_page_is_translated(client, session):
    project = make_project(session)
    make_job(session, project, status=JobStatus.running, total=5, done=2)
    admin_client(client, session)
    page = client.get("/admin", headers={"Accept-Language": "zh-CN"}).text
    assert '<h2 id="jobs-heading">生成任务</h2>' in page
    assert "运行中" in page
    assert "2 / 5 个提示" in page
    catalog = json.loads(
        re.search(r'<script type="application/json" id="i18n-catalog">(.*?)</script>', page)[1]
    )
    assert catalog["{done} / {total} prompts"] == "{done} / {total} 个提示"
    assert "Rank {rank}" not in catalog  # the labeling page's strings stay there


# --------------------------------------------------------------------------- cancel


def test_cancel_by_form_needs_the_csrf_token(client, session):
    project = make_project(session)
    queued = make_job(session, project)
    running = make_job(session, project, status=JobStatus.running, worker="w")
    admin_client(client, session)
    csrf = page_csrf(client.get("/admin").text)

    for data in ({}, {"csrf_token": "forged"}):
        r = client.post(f"/admin/jobs/{queued.id}/cancel", data=data, follow_redirects=False)
        assert r.status_code == 403
        assert "The form has expired" in r.text
    assert db_job(session, queued.id).status == JobStatus.queued

    r = client.post(
        f"/admin/jobs/{queued.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/admin#job-{queued.id}"
    assert db_job(session, queued.id).status == JobStatus.cancelled

    r = client.post(
        f"/admin/jobs/{running.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert r.status_code == 303
    job = db_job(session, running.id)
    assert (job.status, job.cancel_requested) == (JobStatus.running, True)
    row = row_of(client.get("/admin").text, f"job-{running.id}")
    assert re.search(r'data-field="cancelling">', row)

    # Finished or unknown jobs: an error page, nothing changes.
    r = client.post(f"/admin/jobs/{queued.id}/cancel", data={"csrf_token": csrf})
    assert r.status_code == 409
    assert "The job has already finished" in r.text
    r = client.post("/admin/jobs/999999999/cancel", data={"csrf_token": csrf})
    assert r.status_code == 404
    assert "Job not found" in r.text


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.running])
def test_cancel_through_the_json_api_with_the_session_cookie(client, session, status):
    job = make_job(session, make_project(session), status=status)
    admin_client(client, session)
    csrf = page_csrf(client.get("/admin").text)
    url = f"/api/v1/jobs/{job.id}/cancel"
    assert client.post(url).status_code == 403  # no X-CSRF-Token header
    assert client.post(url, headers={"X-CSRF-Token": "nope"}).status_code == 403
    assert db_job(session, job.id).cancel_requested is False
    r = client.post(url, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    expected = JobStatus.cancelled if status == JobStatus.queued else JobStatus.running
    assert r.json()["status"] == expected.value
    assert r.json()["cancel_requested"] is True
    # What the page's script polls, with the same cookie.
    project = client.get(f"/api/v1/jobs/{job.id}").json()["project_id"]
    assert project == job.project_id
    again = client.post(url, headers={"X-CSRF-Token": csrf}).status_code
    assert again == (409 if status == JobStatus.queued else 200)


# --------------------------------------------------------------------------- flash messages


def test_flash_messages_are_signed_shown_once_and_escaped(client, session):
    import base64

    from app.routes._admin import FLASH_COOKIE

    admin_client(client, session)
    csrf = page_csrf(client.get("/admin/users").text)
    r = client.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "new.user", "role": "annotator"},
        follow_redirects=False,
    )
    cookie = r.cookies.get(FLASH_COOKIE) or client.cookies.get(FLASH_COOKIE)
    assert cookie
    set_cookie = r.headers["set-cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=lax" in set_cookie
    page = client.get("/admin")
    assert "User “new.user” created." in page.text
    assert FLASH_COOKIE not in client.cookies  # deleted once shown
    assert 'class="flash"' not in client.get("/admin").text

    # A forged cookie (unsigned, or signed for another message) shows nothing.
    payload = base64.urlsafe_b64encode(b'{"k":"user-created","p":{"username":"<i>x</i>"}}')
    for forged in (payload.decode().rstrip("=") + ".bad", "garbage", cookie + "x"):
        client.cookies.set(FLASH_COOKIE, forged)
        page = client.get("/admin").text
        assert 'class="flash"' not in page
