"""/api/v1 generation jobs: queue, read, list, cancel — and bad input with nothing written."""

from __future__ import annotations

from app.models import GenerationJob
from tests.factories import count, make_admin_headers, make_project, make_prompt


def test_queue_read_list_cancel(client, session):
    h = make_admin_headers(session)
    project = make_project(session, completions_per_task=3)
    p1 = make_prompt(session, project, k=0)
    make_prompt(session, project, k=0)
    body = {
        "model": "smollm2-135m-instruct",
        "params": {"temperature": [0.3, 1.0], "max_new_tokens": 32, "seed": 5},
    }
    r = client.post(f"/api/v1/projects/{project.slug}/generate", json=body, headers=h)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert (job["k"], job["total"], job["done"]) == (3, 2, 0)
    assert job["models"] == ["smollm2-135m-instruct"]
    assert job["backend"] == "transformers"
    assert job["params"]["temperature"] == [0.3, 1.0]

    assert client.get(f"/api/v1/jobs/{job['id']}", headers=h).json()["id"] == job["id"]
    listed = client.get(f"/api/v1/projects/{project.slug}/jobs", headers=h).json()
    assert [j["id"] for j in listed] == [job["id"]]

    only = {"prompt_ids": [p1.id], "k": 1, "backend": "openai", "model": ["a", "b"]}
    r = client.post(f"/api/v1/projects/{project.slug}/generate", json=only, headers=h)
    assert r.status_code == 202
    assert (r.json()["total"], r.json()["k"]) == (1, 1)

    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 409


def test_bad_requests_are_4xx_and_write_nothing(client, session):
    h = make_admin_headers(session)
    project = make_project(session)
    make_prompt(session, project)
    other = make_project(session)
    foreign = make_prompt(session, other)
    empty = make_project(session)
    before = count(session, GenerationJob)
    url = f"/api/v1/projects/{project.slug}/generate"
    cases = [
        (url, {"backend": "vllm"}, 422, "body.backend"),
        (url, {"k": 0}, 422, "body.k"),
        (url, {"k": 17}, 422, "body.k"),
        (url, {"model": ""}, 422, "body.model"),
        (url, {"model": []}, 422, "body.model"),
        (url, {"params": {"temperature": 3}}, 422, "body.params.temperature"),
        (url, {"params": {"temperature": []}}, 422, "body.params.temperature"),
        (url, {"params": {"top_p": 0}}, 422, "body.params.top_p"),
        (url, {"params": {"max_new_tokens": 0}}, 422, "body.params.max_new_tokens"),
        (url, {"params": {"unknown": 1}}, 422, "body.params.unknown"),
        (url, {"prompt_ids": [0]}, 422, "body.prompt_ids.0"),
    ]
    for target, body, status, field in cases:
        r = client.post(target, json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert field in [e["field"] for e in r.json()["errors"]], (body, r.json())
    r = client.post(url, json={"prompt_ids": [foreign.id]}, headers=h)
    assert r.status_code == 422
    assert "not in project" in r.json()["detail"]
    r = client.post(f"/api/v1/projects/{empty.slug}/generate", json={}, headers=h)
    assert r.status_code == 422
    assert "no prompts" in r.json()["detail"]
    assert client.post("/api/v1/projects/nope/generate", json={}, headers=h).status_code == 404
    assert count(session, GenerationJob) == before
    assert client.get("/api/v1/jobs/999999", headers=h).status_code == 404
    assert client.get(f"/api/v1/jobs/{2**64}", headers=h).status_code == 422
    assert client.post("/api/v1/jobs/999999/cancel", headers=h).status_code == 404


def test_project_templates_are_settings(client, session):
    h = make_admin_headers(session)
    project = make_project(session)
    r = client.patch(
        f"/api/v1/projects/{project.slug}",
        json={"system_prompt": "Be concise.", "instruction_template": "Task: {prompt}"},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json()["system_prompt"] == "Be concise."
    assert r.json()["instruction_template"] == "Task: {prompt}"
