"""The quality dashboard page: access (anonymous → login, annotator → 403, unknown project →
404), its sections, charts (accessible SVG) and tables, the outlier highlighted, escaping, no
inline code (on SQLite and PostgreSQL)."""

from __future__ import annotations

import re

from app.models import Role
from app.web import CONTENT_SECURITY_POLICY
from tests.app.test_pages import assert_no_inline_code, logged_in
from tests.factories import make_annotation, make_project, make_prompt, make_user


def test_anonymous_visitors_are_sent_to_login(client, session):
    project = make_project(session)
    r = client.get(f"/admin/projects/{project.slug}/dashboard", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/login?next=/admin/projects/{project.slug}/dashboard"


def test_annotators_get_a_403_page(client, session):
    project = make_project(session)
    logged_in(client, session, role=Role.annotator)
    r = client.get(f"/admin/projects/{project.slug}/dashboard")
    assert r.status_code == 403
    assert "Administrators only" in r.text


def test_unknown_project_is_a_404_page(client, session):
    logged_in(client, session, role=Role.admin)
    r = client.get("/admin/projects/nope/dashboard")
    assert r.status_code == 404
    assert "Project not found" in r.text


def test_empty_project(client, session):
    project = make_project(session)
    logged_in(client, session, role=Role.admin)
    r = client.get(f"/admin/projects/{project.slug}/dashboard")
    assert r.status_code == 200
    assert "No annotations yet." in r.text
    assert_no_inline_code(r.text)


def test_dashboard_shows_charts_tables_and_the_outlier(client, session):
    project = make_project(session, overlap=4, completions_per_task=4, name="<b>Proj</b>")
    good = [make_user(session) for _ in range(3)]
    odd = make_user(session, username="odd<script>")
    for i in range(10):
        prompt = make_prompt(session, project)
        ids = [c.id for c in prompt.completions]
        for u in good:
            make_annotation(
                session,
                prompt,
                u,
                ranking=[[c] for c in ids],
                display_order=ids[i % 4 :] + ids[: i % 4],
                flags={str(ids[3]): ["hallucination"]},
            )
        make_annotation(
            session,
            prompt,
            odd,
            ranking=[[c] for c in reversed(ids)],
            display_order=list(reversed(ids)),
            skip_reason=None,
        )
    logged_in(client, session, role=Role.admin)
    r = client.get(f"/admin/projects/{project.slug}/dashboard")
    assert r.status_code == 200
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    html = r.text
    assert_no_inline_code(html)
    assert "&lt;b&gt;Proj&lt;/b&gt;" in html
    assert "<b>Proj</b>" not in html
    assert "odd&lt;script&gt;" in html
    assert "odd<script>" not in html
    for chart in ("chart-progress", "chart-days", "chart-annotators", "chart-models"):
        match = re.search(rf'<svg [^>]*id="{chart}"[^>]*>', html)
        assert match, chart
        assert 'role="img"' in match.group(0)
        assert f'aria-labelledby="{chart}-title {chart}-desc"' in match.group(0)
        assert f'<title id="{chart}-title">' in html
    row = re.search(rf'<tr id="annotator-{odd.id}"[^>]*>', html).group(0)
    assert 'data-outlier="true"' in row
    assert 'class="outlier"' in row
    assert "low agreement" in html
    assert "position bias" in html
    for u in good:
        assert re.search(rf'<tr id="annotator-{u.id}" [^>]*data-outlier="false"', html)
    assert 'id="model-table"' in html
    assert "m0" in html
    assert "m1" in html
    assert "hallucination" in html
    assert f'href="/api/v1/projects/{project.slug}/stats.csv?table=annotators"' in html
