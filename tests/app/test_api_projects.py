"""/api/v1/projects."""

from __future__ import annotations

import json

from app.models import DEFAULT_FLAGS, Project
from tests.factories import (
    count,
    make_admin_headers,
    make_annotation,
    make_project,
    make_prompt,
    make_user,
)


def test_create_with_defaults(client, session):
    h = make_admin_headers(session)
    r = client.post("/api/v1/projects", json={"name": "Helpful", "slug": "helpful"}, headers=h)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["slug"] == "helpful"
    assert body["completions_per_task"] == 4
    assert body["overlap"] == 3
    assert body["lease_seconds"] == 600
    assert body["flags"] == list(DEFAULT_FLAGS)
    assert body["allow_ties"] is True


def test_create_rejects_bad_settings_and_writes_nothing(client, session):
    h = make_admin_headers(session)
    before = count(session, Project)
    for bad, field in [
        ({"name": "x", "slug": "Bad Slug"}, "body.slug"),
        ({"name": "x", "slug": "ok", "completions_per_task": 10}, "body.completions_per_task"),
        ({"name": "x", "slug": "ok", "completions_per_task": 1}, "body.completions_per_task"),
        ({"name": "x", "slug": "ok", "overlap": 0}, "body.overlap"),
        ({"name": "x", "slug": "ok", "lease_seconds": 5}, "body.lease_seconds"),
        ({"name": "x", "slug": "ok", "flags": ["a", "a"]}, "body.flags"),
        ({"name": "", "slug": "ok"}, "body.name"),
        ({"name": "x", "slug": "ok", "unknown": 1}, "body.unknown"),
    ]:
        r = client.post("/api/v1/projects", json=bad, headers=h)
        assert r.status_code == 422, (bad, r.text)
        assert field in [e["field"] for e in r.json()["errors"]], r.json()
    assert count(session, Project) == before


def test_duplicate_slug_is_409(client, session):
    h = make_admin_headers(session)
    make_project(session, slug="taken")
    r = client.post("/api/v1/projects", json={"name": "x", "slug": "taken"}, headers=h)
    assert r.status_code == 409
    assert "taken" in r.json()["detail"]


def test_get_includes_counts(client, session):
    h = make_admin_headers(session)
    project = make_project(session)
    prompt = make_prompt(session, project, k=3)
    make_prompt(session, project, k=2)
    make_annotation(session, prompt, make_user(session))
    r = client.get(f"/api/v1/projects/{project.slug}", headers=h)
    assert r.status_code == 200
    body = r.json()
    assert (body["prompt_count"], body["completion_count"], body["annotation_count"]) == (2, 5, 1)


def test_list_and_404(client, session):
    h = make_admin_headers(session)
    a, b = make_project(session), make_project(session)
    r = client.get("/api/v1/projects", headers=h)
    assert [p["slug"] for p in r.json()][-2:] == [a.slug, b.slug]
    r = client.get("/api/v1/projects/nope", headers=h)
    assert r.status_code == 404
    assert r.json() == {"detail": "project 'nope' not found"}


def test_patch_changes_only_given_fields(client, session):
    h = make_admin_headers(session)
    project = make_project(session, overlap=3)
    r = client.patch(
        f"/api/v1/projects/{project.slug}", json={"overlap": 5, "likert": False}, headers=h
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlap"] == 5
    assert body["likert"] is False
    assert body["completions_per_task"] == 4
    assert body["name"] == project.name
    r = client.patch(
        f"/api/v1/projects/{project.slug}", json={"completions_per_task": 12}, headers=h
    )
    assert r.status_code == 422
    r = client.patch("/api/v1/projects/missing", json={"overlap": 2}, headers=h)
    assert r.status_code == 404


def test_unstorable_text_is_422_not_500(client, session):
    h = make_admin_headers(session)
    before = count(session, Project)
    for name in ["nul\x00byte", "lone \ud800 surrogate"]:
        r = client.post(
            "/api/v1/projects",
            content=json.dumps({"name": name, "slug": "odd"}),
            headers={**h, "content-type": "application/json"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "body.name"
    assert count(session, Project) == before


def test_out_of_range_ids_are_422_not_500(client, session):
    h = make_admin_headers(session)
    project = make_project(session)
    assert client.get(f"/api/v1/prompts/{2**70}", headers=h).status_code == 422
    assert client.get("/api/v1/prompts/0", headers=h).status_code == 422
    assert client.delete(f"/api/v1/tokens/{2**64}", headers=h).status_code == 422
    r = client.get(f"/api/v1/projects/{project.slug}/prompts?after={2**64}", headers=h)
    assert r.status_code == 422
    r = client.get(f"/api/v1/projects/{project.slug}/prompts?after=%C2%B2", headers=h)
    assert r.status_code == 422
