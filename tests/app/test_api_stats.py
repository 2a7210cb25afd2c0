"""/api/v1/projects/{slug}/stats and stats.csv: authentication (401 / 403 / 200), 404, the JSON
shape, and the CSV tables (on SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io

from app.models import Role
from tests.factories import (
    auth,
    make_admin_headers,
    make_annotation,
    make_project,
    make_prompt,
    make_token,
    make_user,
)


def seeded(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    users = [make_user(session) for _ in range(2)]
    for _ in range(3):
        prompt = make_prompt(session, project, k=2)
        ids = [c.id for c in prompt.completions]
        for u in users:
            make_annotation(session, prompt, u, ranking=[[ids[0]], [ids[1]]], duration_ms=1500)
    return project, users


def test_stats_need_an_admin(client, session):
    project, _ = seeded(session)
    url = f"/api/v1/projects/{project.slug}/stats"
    assert client.get(url).status_code == 401
    assert client.get(url + ".csv").status_code == 401
    annotator = auth(make_token(session, make_user(session, role=Role.annotator)))
    assert client.get(url, headers=annotator).status_code == 403
    assert client.get(url + ".csv", headers=annotator).status_code == 403
    assert client.get(url, headers=make_admin_headers(session)).status_code == 200


def test_unknown_project_is_404(client, session):
    r = client.get("/api/v1/projects/nope/stats", headers=make_admin_headers(session))
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


def test_json_shape(client, session):
    project, users = seeded(session)
    r = client.get(f"/api/v1/projects/{project.slug}/stats", headers=make_admin_headers(session))
    body = r.json()
    assert set(body) >= {
        "progress",
        "agreement",
        "bias",
        "annotators",
        "models",
        "model_pairs",
        "flags",
        "outlier_rule",
    }
    assert body["progress"]["complete"] == 3
    assert body["progress"]["median_duration_ms"] == 1500
    assert body["agreement"]["pairwise"]["rate"] == 1.0
    assert body["agreement"]["resamples"] == 1000
    names = {a["username"] for a in body["annotators"]}
    assert names == {u.username for u in users}
    assert all(a["pseudonym"].startswith("ann-") for a in body["annotators"])
    assert [m["model"] for m in body["models"]] == ["m0", "m1"]


def test_csv_download(client, session):
    project, users = seeded(session)
    headers = make_admin_headers(session)
    r = client.get(f"/api/v1/projects/{project.slug}/stats.csv", headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert (
        r.headers["content-disposition"] == f'attachment; filename="{project.slug}-annotators.csv"'
    )
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["username"] for row in rows} == {u.username for u in users}
    r = client.get(f"/api/v1/projects/{project.slug}/stats.csv?table=models", headers=headers)
    assert r.text.splitlines()[0] == "rank,model,strength,ci_low,ci_high,wins,comparisons,win_rate"
    r = client.get(f"/api/v1/projects/{project.slug}/stats.csv?table=nope", headers=headers)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "query.table"
