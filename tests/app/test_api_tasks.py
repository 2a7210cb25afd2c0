"""/api/v1 labeling routes: next, submit, skip, extend, members; bearer and cookie auth."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from app.models import Annotation, Lease, Role, WebSession, utcnow
from app.security import hash_token
from tests.factories import auth, count, make_project, make_prompt, make_token, make_user


def annotator(session):
    user = make_user(session)
    return user, auth(make_token(session, user))


def next_task(client, slug, headers, **params):
    return client.get(f"/api/v1/projects/{slug}/tasks/next", headers=headers, params=params)


def order(task):
    return [[c["id"]] for c in task["completions"]]


def test_next_then_submit(client, session):
    project = make_project(session)
    prompt = make_prompt(session, project)
    _, headers = annotator(session)

    got = next_task(client, project.slug, headers)
    assert got.status_code == 200, got.text
    task = got.json()
    assert set(task) == {"lease_id", "expires_at", "prompt", "completions"}
    assert task["prompt"] == {"id": prompt.id, "messages": prompt.messages}
    assert [c["label"] for c in task["completions"]] == list("ABCD")

    body = {"ranking": order(task), "likert": {str(task["completions"][0]["id"]): 7}}
    done = client.post(f"/api/v1/leases/{task['lease_id']}/submit", json=body, headers=headers)
    assert done.status_code == 201, done.text
    assert done.json()["lease_id"] == task["lease_id"]

    retry = client.post(f"/api/v1/leases/{task['lease_id']}/submit", json=body, headers=headers)
    assert retry.status_code == 201
    assert retry.json() == done.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert count(session, Annotation) == 1

    assert next_task(client, project.slug, headers).status_code == 204


def test_ids_given_as_strings_are_accepted(client, session):
    project = make_project(session)
    make_prompt(session, project)
    _, headers = annotator(session)
    task = next_task(client, project.slug, headers).json()
    body = {"ranking": [[str(c["id"])] for c in task["completions"]]}
    done = client.post(f"/api/v1/leases/{task['lease_id']}/submit", json=body, headers=headers)
    assert done.status_code == 201, done.text


def test_errors_are_4xx_with_the_field(client, session):
    project = make_project(session, allow_ties=False)
    make_prompt(session, project)
    make_prompt(session, project)
    _, headers = annotator(session)
    _, other = annotator(session)
    task = next_task(client, project.slug, headers).json()
    url = f"/api/v1/leases/{task['lease_id']}/submit"
    ids = [c["id"] for c in task["completions"]]

    tie = client.post(url, json={"ranking": [ids[:2], [ids[2]], [ids[3]]]}, headers=headers)
    assert tie.status_code == 422
    assert tie.json()["errors"] == [
        {"field": "ranking", "message": "ties are not allowed in this project"}
    ]
    likert = client.post(
        url, json={"ranking": order(task), "likert": {str(ids[0]): 8}}, headers=headers
    )
    assert likert.status_code == 422
    assert likert.json()["errors"][0]["field"] == f"body.likert.{ids[0]}"
    extra = client.post(url, json={"ranking": order(task), "colour": "red"}, headers=headers)
    assert extra.status_code == 422
    assert client.post(url, json={"ranking": order(task)}, headers=other).status_code == 403
    assert client.post(url, content=b"{nope", headers=headers).status_code == 422
    assert client.post("/api/v1/leases/0/submit", json={}, headers=headers).status_code == 422
    missing = client.post("/api/v1/leases/999999/submit", json={"ranking": [[1]]}, headers=headers)
    assert missing.status_code == 404
    assert count(session, Annotation) == 0

    session.execute(
        update(Lease)
        .where(Lease.id == task["lease_id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    expired = client.post(url, json={"ranking": order(task)}, headers=headers)
    assert expired.status_code == 409
    assert "expired" in expired.json()["detail"]
    extend = client.post(f"/api/v1/leases/{task['lease_id']}/extend", headers=headers)
    assert extend.status_code == 409


def test_skip_and_extend(client, session):
    project = make_project(session)
    make_prompt(session, project)
    make_prompt(session, project)
    _, headers = annotator(session)
    first = next_task(client, project.slug, headers).json()
    prefetched = next_task(client, project.slug, headers, exclude=first["lease_id"]).json()
    assert prefetched["lease_id"] != first["lease_id"]

    extended = client.post(f"/api/v1/leases/{first['lease_id']}/extend", headers=headers)
    assert extended.status_code == 200
    assert extended.json()["expires_at"] >= first["expires_at"]
    skipped = client.post(
        f"/api/v1/leases/{first['lease_id']}/skip", json={"reason": "unsure"}, headers=headers
    )
    assert skipped.status_code == 201
    assert next_task(client, project.slug, headers).json()["lease_id"] == prefetched["lease_id"]


def test_members_only(client, session):
    project = make_project(session, members_only=True)
    make_prompt(session, project)
    member, member_headers = annotator(session)
    _, outsider = annotator(session)
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    url = f"/api/v1/projects/{project.slug}/members"

    assert next_task(client, project.slug, member_headers).status_code == 403
    added = client.post(url, json={"usernames": [member.username]}, headers=admin)
    assert added.status_code == 200
    assert added.json() == [member.username]
    assert client.get(url, headers=admin).json() == [member.username]
    assert next_task(client, project.slug, member_headers).status_code == 200
    assert next_task(client, project.slug, outsider).status_code == 403

    unknown = client.post(url, json={"usernames": ["ghost", member.username]}, headers=admin)
    assert unknown.status_code == 422
    assert "ghost" in unknown.json()["detail"]
    removed = client.request("DELETE", url, json={"usernames": [member.username]}, headers=admin)
    assert removed.json() == []

    opened = client.patch(
        f"/api/v1/projects/{project.slug}", json={"members_only": False}, headers=admin
    )
    assert opened.json()["members_only"] is False
    assert next_task(client, project.slug, outsider).status_code == 200


def test_session_cookie_needs_the_csrf_header_for_writes(client, session):
    project = make_project(session)
    make_prompt(session, project)
    user = make_user(session)
    secret = "cookie-secret-for-test"
    session.add(
        WebSession(
            token_hash=hash_token(secret),
            user_id=user.id,
            csrf_token="csrf-123",
            expires_at=utcnow() + timedelta(hours=1),
        )
    )
    session.commit()
    client.cookies.set("prefero_session", secret)

    task = next_task(client, project.slug, {}).json()  # GET: no CSRF header needed
    url = f"/api/v1/leases/{task['lease_id']}/submit"
    body = {"ranking": order(task)}
    no_header = client.post(url, json=body)
    assert no_header.status_code == 403
    assert "CSRF" in no_header.json()["detail"]
    wrong = client.post(url, json=body, headers={"X-CSRF-Token": "csrf-12"})
    assert wrong.status_code == 403
    assert count(session, Annotation) == 0
    ok = client.post(url, json=body, headers={"X-CSRF-Token": "csrf-123"})
    assert ok.status_code == 201
    # A session cookie never grants admin routes to an annotator.
    assert client.get("/api/v1/projects").status_code == 403

    client.cookies.set("prefero_session", "forged")
    assert next_task(client, project.slug, {}).status_code == 401
