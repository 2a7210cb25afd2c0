"""The admin pages of a project: create and edit with field errors and the guidelines preview,
prompt import by file upload (line-numbered errors, nothing written), export links, the prompt
browser and the prompt page (on SQLite and PostgreSQL, through the ASGI app)."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from sqlalchemy import select

from app.models import AnnotationStatus, Completion, Project, Prompt, Role
from app.web import CONTENT_SECURITY_POLICY
from tests.app.test_pages import assert_no_inline_code, logged_in
from tests.app.test_pages_admin import page_csrf
from tests.factories import count, make_annotation, make_project, make_prompt, make_user


def admin(client, session):
    return logged_in(client, session, role=Role.admin)


def form_for(csrf: str, **overrides) -> dict[str, str]:
    data = {
        "csrf_token": csrf,
        "name": "Helpfulness",
        "slug": "helpful-v1",
        "guidelines": "# Rank by helpfulness\n\nBest **first**.",
        "completions_per_task": "3",
        "overlap": "2",
        "lease_seconds": "900",
        "flags": "harmful\n  factually wrong  \n\noff-topic\n",
        "allow_ties": "1",
        "likert": "1",
        "system_prompt": "",
        "instruction_template": "",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def field_error(html: str, name: str) -> str:
    match = re.search(rf'<ul class="field-error" id="{name}-error">(.*?)</ul>', html, re.DOTALL)
    assert match, f"no error shown for {name}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(1))).strip()


def db_project(session, slug: str) -> Project:
    session.expire_all()
    project = session.scalar(select(Project).where(Project.slug == slug))
    assert project is not None
    return project


def flash(html: str) -> str:
    match = re.search(r'<p class="flash" id="flash" role="status">(.*?)</p>', html, re.DOTALL)
    assert match, "no flash message"
    return match.group(1).strip()


def upload(client, slug: str, csrf: str, content: bytes, name: str = "prompts.jsonl", **kw):
    return client.post(
        f"/admin/projects/{slug}/import",
        data={"csrf_token": csrf},
        files={"file": (name, content, "application/octet-stream")},
        **kw,
    )


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def record(i: int, k: int = 2) -> dict:
    return {
        "id": f"r{i}",
        "prompt": f"Question {i}?",
        "completions": [{"id": f"c{j}", "text": f"Answer {j} to {i}"} for j in range(k)],
    }


# --------------------------------------------------------------------------- create / edit


def test_the_admin_page_links_every_project_and_the_new_project_form(client, session):
    project = make_project(session, name="Linked")
    admin(client, session)
    page = client.get("/admin").text
    assert f'href="/admin/projects/{project.slug}"' in page
    assert 'href="/admin/new-project"' in page
    assert 'href="/admin/users"' in page
    form = client.get("/admin/new-project")
    assert form.status_code == 200
    assert_no_inline_code(form.text)
    assert 'name="completions_per_task" type="number"' in form.text
    assert 'value="600"' in form.text  # the API's defaults
    assert "harmful" in form.text


def test_create_a_project_through_the_form(client, session):
    admin(client, session)
    csrf = page_csrf(client.get("/admin/new-project").text)
    r = client.post("/admin/new-project", data=form_for(csrf), follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/admin/projects/helpful-v1"
    project = db_project(session, "helpful-v1")
    assert (project.name, project.completions_per_task, project.overlap) == ("Helpfulness", 3, 2)
    assert project.flags == ["harmful", "factually wrong", "off-topic"]
    assert (project.allow_ties, project.likert, project.require_rationale) == (True, True, False)
    assert (project.members_only, project.lease_seconds) == (False, 900)
    page = client.get(r.headers["location"])
    assert page.status_code == 200
    assert flash(page.text) == "Project “Helpfulness” created. Import prompts below."
    assert "<h1>Rank by helpfulness</h1>" in page.text  # the guidelines, rendered
    # Shown once: the next visit has no message.
    assert 'class="flash"' not in client.get("/admin/projects/helpful-v1").text


def test_invalid_fields_are_shown_next_to_them_and_nothing_is_written(client, session):
    make_project(session, slug="taken")
    admin(client, session)
    csrf = page_csrf(client.get("/admin/new-project").text)
    before = count(session, Project)
    bad = form_for(
        csrf,
        name="  ",
        slug="Not A Slug",
        completions_per_task="12",
        overlap="many",
        lease_seconds="5",
        flags="a\na",
    )
    r = client.post("/admin/new-project", data=bad)
    assert r.status_code == 422
    assert field_error(r.text, "name") == "Required."
    assert "Lower-case letters" in field_error(r.text, "slug")
    assert field_error(r.text, "completions_per_task") == "Must be at most 9."
    assert field_error(r.text, "overlap") == "Enter a whole number."
    assert field_error(r.text, "lease_seconds") == "Must be at least 30."
    assert field_error(r.text, "flags") == "flags must be unique"
    assert 'aria-invalid="true" aria-describedby="overlap-error' in r.text
    assert 'value="many"' in r.text  # the typed values are kept
    assert count(session, Project) == before
    # A slug in use: 409, next to the slug.
    r = client.post("/admin/new-project", data=form_for(csrf, slug="taken"))
    assert r.status_code == 409
    assert field_error(r.text, "slug") == "A project with this slug already exists."
    assert count(session, Project) == before


def test_edit_the_settings(client, session):
    project = make_project(session, name="Old", completions_per_task=4, likert=True)
    admin(client, session)
    page = client.get(f"/admin/projects/{project.slug}")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store"
    assert_no_inline_code(page.text)
    csrf = page_csrf(page.text)
    data = form_for(csrf, name="New name", slug=None, likert=None, members_only="1")
    data["require_rationale"] = "1"
    r = client.post(f"/admin/projects/{project.slug}", data=data, follow_redirects=False)
    assert r.status_code == 303
    got = db_project(session, project.slug)
    assert (got.name, got.completions_per_task, got.likert) == ("New name", 3, False)
    assert (got.require_rationale, got.members_only) == (True, True)
    assert r.headers["location"] == f"/admin/projects/{project.slug}#flash"
    assert flash(client.get(r.headers["location"]).text) == "Settings saved."

    r = client.post(
        f"/admin/projects/{project.slug}",
        data={**data, "overlap": "0", "name": "n" * 201, "flags": "x" * 101},
    )
    assert r.status_code == 422
    assert field_error(r.text, "overlap") == "Must be at least 1."
    assert field_error(r.text, "name") == "At most 200 characters."
    assert field_error(r.text, "flags") == "Line 1: At most 100 characters."
    assert db_project(session, project.slug).overlap == 2


def test_the_guidelines_preview_renders_without_saving_and_is_sanitised(client, session):
    project = make_project(session, guidelines="Saved text")
    admin(client, session)
    csrf = page_csrf(client.get(f"/admin/projects/{project.slug}").text)
    evil = (
        "## Draft\n\n<script>alert(1)</script> [x](javascript:alert(2)) "
        "<img src=x onerror=alert(3)>"
    )
    data = form_for(csrf, slug=None, guidelines=evil, action="preview")
    r = client.post(f"/admin/projects/{project.slug}", data=data)
    assert r.status_code == 200
    assert "<h2>Draft</h2>" in r.text
    assert "Preview of the text in the form: not saved yet." in r.text
    assert "<script>alert" not in r.text
    assert "<img src=x" not in r.text
    assert 'href="javascript' not in r.text
    assert_no_inline_code(r.text)
    assert db_project(session, project.slug).guidelines == "Saved text"
    # The new-project form previews too.
    r = client.post("/admin/new-project", data=form_for(csrf, action="preview"))
    assert r.status_code == 200
    assert "<h1>Rank by helpfulness</h1>" in r.text
    assert count(session, Project) == 1


def test_forms_need_the_csrf_token(client, session):
    project = make_project(session, name="Keep")
    admin(client, session)
    for data in (form_for(""), form_for("forged")):
        r = client.post("/admin/new-project", data=data)
        assert r.status_code == 403
        assert "The form has expired" in r.text
        r = client.post(f"/admin/projects/{project.slug}", data=data)
        assert r.status_code == 403
        r = upload(client, project.slug, data["csrf_token"], jsonl(record(1)))
        assert r.status_code == 403
    assert count(session, Project) == 1
    assert db_project(session, project.slug).name == "Keep"
    assert count(session, Prompt) == 0


def test_unknown_projects_are_404_pages(client, session):
    admin(client, session)
    csrf = page_csrf(client.get("/admin").text)
    for r in (
        client.get("/admin/projects/nope"),
        client.get("/admin/projects/nope/prompts"),
        client.post("/admin/projects/nope", data=form_for(csrf, slug=None)),
        upload(client, "nope", csrf, jsonl(record(1))),
    ):
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/html")
        assert "Not found" in r.text


def test_names_are_escaped_and_export_links_are_there(client, session):
    evil = "<script>alert(1)</script>"
    project = make_project(session, name=evil, flags=[evil])
    admin(client, session)
    page = client.get(f"/admin/projects/{project.slug}").text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    base = f"/api/v1/projects/{project.slug}/export"
    for fmt in ("pairs", "rankings", "consensus", "hh"):
        assert f'href="{base}?format={fmt}"' in page
        assert f'href="{base}?format={fmt}&amp;file=parquet"' in page
    assert f'<form method="get" action="{base}"' in page
    assert 'name="split"' in page
    assert 'value="test"' in page
    assert f'href="/admin/projects/{project.slug}/dashboard"' in page
    assert f'href="/admin/projects/{project.slug}/prompts"' in page


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("compress", [False, True])
def test_import_a_good_file(client, session, compress):
    project = make_project(session)
    admin(client, session)
    csrf = page_csrf(client.get(f"/admin/projects/{project.slug}").text)
    content = jsonl(record(1), record(2, k=3))
    name = "prompts.jsonl"
    if compress:
        content, name = gzip.compress(content), "prompts.jsonl.gz"
    r = upload(client, project.slug, csrf, content, name, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/admin/projects/{project.slug}"
    page = client.get(r.headers["location"]).text
    assert flash(page) == (
        "Import finished: 2 prompts created, 0 already present; "
        "5 completions added, 0 already present."
    )
    assert re.search(r'id="prompt-count">2<', page)
    assert count(session, Completion) == 5
    # Again: everything is already there.
    r = upload(client, project.slug, csrf, content, name)
    assert "2 already present; 0 completions added" in flash(r.text)


def test_a_bad_file_lists_its_problems_by_line_and_writes_nothing(client, session):
    project = make_project(session)
    admin(client, session)
    csrf = page_csrf(client.get(f"/admin/projects/{project.slug}").text)
    content = (
        jsonl(record(1))
        + b"{not json\n"
        + jsonl({"id": "r3", "completions": []})
        + jsonl({"id": "<b>r4</b>", "prompt": "ok", "completions": "<script>x</script>"})
    )
    r = upload(client, project.slug, csrf, content)
    assert r.status_code == 422
    assert_no_inline_code(r.text)
    block = re.search(
        r'<div class="alert" role="alert" id="import-errors">(.*?)</form>', r.text, re.S
    )
    assert block
    assert "Nothing was written." in block.group(1)
    rows = re.findall(
        r'<tr>\s*<td class="num">(\d+)</td>\s*<td><code>(.*?)</code></td>\s*<td>(.*?)</td>',
        block.group(1),
        re.S,
    )
    lines = [int(line) for line, _, _ in rows]
    assert lines[:1] == [2]
    assert 3 in lines
    assert 4 in lines
    assert "<script>x" not in r.text
    assert 'aria-describedby="import-errors"' in r.text
    assert count(session, Prompt) == 0


def test_import_without_a_file_or_too_large(client, session, settings):
    project = make_project(session)
    admin(client, session)
    csrf = page_csrf(client.get(f"/admin/projects/{project.slug}").text)
    r = client.post(
        f"/admin/projects/{project.slug}/import",
        data={"csrf_token": csrf},
        files={"file": ("", b"", "application/octet-stream")},
    )
    assert r.status_code == 422
    assert "Choose a file to import." in r.text
    settings.max_import_bytes = 2000
    r = upload(client, project.slug, csrf, jsonl(*[record(i) for i in range(50)]))
    assert r.status_code == 413
    assert "larger than the import limit of 2000 bytes" in r.text
    assert count(session, Prompt) == 0


# --------------------------------------------------------------------------- browsing


def test_the_prompt_browser_pages_through_the_prompts(client, session, monkeypatch):
    from app.routes import pages_admin_projects

    monkeypatch.setattr(pages_admin_projects, "PAGE_SIZE", 2)
    project = make_project(session)
    prompts = [make_prompt(session, project, k=3, text=f"Question <{i}>") for i in range(5)]
    make_annotation(session, prompts[0], make_user(session))
    admin(client, session)
    first = client.get(f"/admin/projects/{project.slug}/prompts")
    assert first.status_code == 200
    assert_no_inline_code(first.text)
    ids = [int(i) for i in re.findall(r'<tr id="prompt-(\d+)"', first.text)]
    assert ids == [prompts[0].id, prompts[1].id]
    assert "Question &lt;0&gt;" in first.text
    assert re.search(r'data-field="annotation_count">1<', first.text)
    assert re.search(r'data-field="completion_count">3<', first.text)
    assert "5 prompts in this project" in first.text
    link = re.search(r'href="([^"]+)" rel="next"', first.text).group(1)
    second = client.get(link.replace("&amp;", "&"))
    assert [int(i) for i in re.findall(r'<tr id="prompt-(\d+)"', second.text)] == [
        prompts[2].id,
        prompts[3].id,
    ]
    assert 'rel="first"' in second.text
    last = client.get(re.search(r'href="([^"]+)" rel="next"', second.text).group(1))
    assert [int(i) for i in re.findall(r'<tr id="prompt-(\d+)"', last.text)] == [prompts[4].id]
    assert 'rel="next"' not in last.text
    bad = client.get(f"/admin/projects/{project.slug}/prompts?after=x")
    assert bad.status_code == 422
    assert "text/html" in bad.headers["content-type"]


def test_the_prompt_page_shows_completions_and_annotations(client, session):
    project = make_project(session, completions_per_task=3)
    prompt = make_prompt(session, project, k=3, text="Say <hi>\n  twice")
    a, b, c = (x.id for x in prompt.completions)
    prompt.completions[1].text = "<script>alert(1)</script>\n    indented"
    session.commit()
    ann = make_user(session, username="alice")
    make_annotation(
        session,
        prompt,
        ann,
        ranking=[[c], [a, b]],
        display_order=[b, c, a],
        likert={str(a): 2, str(c): 7},
        flags={str(b): ["harmful"]},
        rationale="C is <best>",
        duration_ms=12345,
    )
    make_annotation(session, prompt, ann, revision=2, ranking=[[a], [b], [c]])
    make_annotation(
        session,
        prompt,
        make_user(session, username="bob"),
        status=AnnotationStatus.skipped,
        ranking=[],
        skip_reason="unclear",
    )
    other = make_project(session)
    admin(client, session)
    r = client.get(f"/admin/projects/{project.slug}/prompts/{prompt.id}")
    assert r.status_code == 200
    html = r.text
    assert_no_inline_code(html)
    assert "Say &lt;hi&gt;\n  twice" in html  # escaped, whitespace kept (pre-wrap)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\n    indented" in html
    assert "<script>alert" not in html
    first, second, skipped = re.findall(r'<li class="annotation[^"]*" id="annotation-\d+">', html)
    assert "superseded" in first
    assert "superseded" not in second
    assert "skipped" in skipped
    rankings = re.findall(r'data-field="ranking">(.*?)</dd>', html, re.S)
    assert rankings == ["C &gt; A = B", "A &gt; B &gt; C"]
    assert re.search(r'data-field="likert">A: 2, C: 7<', html)
    assert re.search(r'data-field="flags">B: harmful<', html)
    assert "C is &lt;best&gt;" in html
    assert "12.3 s" in html
    assert "unclear" in html
    assert "alice" in html
    assert "bob" in html
    assert "Shown as" in html
    assert "B, C, A" in html
    # Only under its own project.
    assert client.get(f"/admin/projects/{other.slug}/prompts/{prompt.id}").status_code == 404
    assert client.get(f"/admin/projects/{project.slug}/prompts/999999999").status_code == 404


# --------------------------------------------------------------------------- members


def test_members_are_added_and_removed(client, session):
    project = make_project(session, members_only=True)
    for name in ("zoe", "adam"):
        make_user(session, username=name)
    admin(client, session)
    page = client.get(f"/admin/projects/{project.slug}").text
    assert "No members yet." in page
    assert "Only these users may label this project." in page
    csrf = page_csrf(page)
    url = f"/admin/projects/{project.slug}/members"
    r = client.post(
        url,
        data={"csrf_token": csrf, "action": "add", "usernames": "zoe,\r\nadam"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/admin/projects/{project.slug}#members"
    page = client.get(r.headers["location"]).text
    assert flash(page) == "Members added: zoe, adam."
    listed = re.search(r'<ul class="member-list" id="member-list">(.*?)</ul>', page, re.S)
    assert re.findall(r'<a href="/admin/users/(\w+)">', listed.group(1)) == ["adam", "zoe"]
    assert 'aria-label="Remove zoe from the members"' in page

    # Unknown users: nothing changes, they are named.
    r = client.post(url, data={"csrf_token": csrf, "action": "add", "usernames": "ghost <b>x</b>"})
    assert r.status_code == 422
    assert "no user &#39;ghost&#39;" in r.text
    assert "&lt;b&gt;x&lt;/b&gt;" in r.text
    r = client.post(url, data={"csrf_token": csrf, "action": "add", "usernames": "  "})
    assert r.status_code == 422
    assert "Enter at least one username." in r.text

    r = client.post(url, data={"csrf_token": csrf, "action": "remove", "username": "zoe"})
    assert flash(r.text) == "Removed from the members: zoe."
    listed = re.search(r'<ul class="member-list" id="member-list">(.*?)</ul>', r.text, re.S)
    assert re.findall(r'<a href="/admin/users/(\w+)">', listed.group(1)) == ["adam"]
    assert client.post(url, data={"action": "remove", "username": "adam"}).status_code == 403


def test_anonymous_visitors_come_back_to_the_page_after_login(client, session):
    project = make_project(session)
    r = client.get(f"/admin/projects/{project.slug}/prompts?after=5", follow_redirects=False)
    assert r.status_code == 303
    assert (
        r.headers["location"] == f"/login?next=/admin/projects/{project.slug}/prompts%3Fafter%3D5"
    )
    # A form posted without a login goes back to the page showing it (GET), not to the POST URL.
    r = client.post(f"/admin/projects/{project.slug}/import", follow_redirects=False)
    assert r.headers["location"] == f"/login?next=/admin/projects/{project.slug}"
    assert count(session, Prompt) == 0
