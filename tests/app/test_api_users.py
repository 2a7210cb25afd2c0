"""/api/v1/users and tokens."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import event

from app.models import ApiToken, Role, User, utcnow
from app.security import verify_password
from app.services import users
from tests.factories import auth, count, make_admin_headers, make_token, make_user


def test_create_user_with_password(client, session):
    h = make_admin_headers(session)
    r = client.post(
        "/api/v1/users",
        json={"username": "ann", "password": "long enough pw", "role": "annotator"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["username"] == "ann"
    assert body["role"] == "annotator"
    assert "password" not in r.text
    user = session.get(User, body["id"])
    assert user.password_hash.startswith("$argon2id$")
    assert verify_password(user.password_hash, "long enough pw")


def test_create_user_rejects_bad_input(client, session):
    h = make_admin_headers(session)
    before = count(session, User)
    for bad in [
        {"username": "has space", "password": "long enough"},
        {"username": "ok", "password": "short"},
        {"username": "ok", "role": "root"},
        {"username": ""},
    ]:
        r = client.post("/api/v1/users", json=bad, headers=h)
        assert r.status_code == 422, bad
        assert r.json()["errors"], r.json()
    assert count(session, User) == before


def test_duplicate_username_is_409(client, session):
    h = make_admin_headers(session)
    make_user(session, username="dup")
    r = client.post("/api/v1/users", json={"username": "dup"}, headers=h)
    assert r.status_code == 409


def test_list_users(client, session):
    h = make_admin_headers(session)
    make_user(session, username="zed")
    names = [u["username"] for u in client.get("/api/v1/users", headers=h).json()]
    assert "zed" in names


def test_token_lifecycle(client, session):
    h = make_admin_headers(session)
    make_user(session, username="bot", role=Role.admin)
    r = client.post("/api/v1/users/bot/tokens", json={"name": "ci"}, headers=h)
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["token"]
    assert secret.startswith("pf_")
    stored = session.get(ApiToken, created["id"])
    assert secret not in stored.token_hash  # only the hash is stored

    assert client.get("/api/v1/projects", headers=auth(secret)).status_code == 200
    listed = client.get("/api/v1/users/bot/tokens", headers=h).json()
    assert [t["name"] for t in listed] == ["ci"]
    assert "token" not in listed[0]
    assert listed[0]["last_used_at"] is not None

    assert client.delete(f"/api/v1/tokens/{created['id']}", headers=h).status_code == 204
    r = client.get("/api/v1/projects", headers=auth(secret))
    assert r.status_code == 401  # revocation takes effect at once
    assert r.json()["detail"] == "token revoked"
    assert client.delete("/api/v1/tokens/999999", headers=h).status_code == 404
    assert client.post("/api/v1/users/nobody/tokens", json={}, headers=h).status_code == 404


def test_last_used_is_refreshed_at_most_once_a_minute(client, session):
    admin = make_user(session, role=Role.admin)
    secret = make_token(session, admin)
    client.get("/api/v1/projects", headers=auth(secret))
    token = session.query(ApiToken).filter_by(user_id=admin.id).one()
    first = token.last_used_at
    client.get("/api/v1/projects", headers=auth(secret))
    session.refresh(token)
    assert token.last_used_at == first
    token.last_used_at = utcnow() - timedelta(minutes=5)
    session.commit()
    users.forget_checked_tokens()  # edited behind the app's back: its token cache cannot know
    client.get("/api/v1/projects", headers=auth(secret))
    session.refresh(token)
    assert token.last_used_at > first - timedelta(seconds=1)


def test_deactivated_user_token_is_rejected(client, session):
    admin = make_user(session, role=Role.admin)
    secret = make_token(session, admin)
    admin.active = False
    session.commit()
    r = client.get("/api/v1/projects", headers=auth(secret))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_patch_deactivates_and_reactivates_a_user(client, session):
    from app.models import WebSession
    from tests.app.test_pages import log_in

    h = make_admin_headers(session)
    user = make_user(session, username="leaver")
    secret = make_token(session, user)
    assert log_in(client, "leaver").status_code == 303
    assert count(session, WebSession) == 1
    next_task = "/api/v1/projects/none/tasks/next"
    assert client.get(next_task, headers=auth(secret)).status_code == 404

    r = client.patch("/api/v1/users/leaver", json={"active": False}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False
    assert r.json()["username"] == "leaver"
    assert count(session, WebSession) == 0  # the browser session ended
    r = client.get(next_task, headers=auth(secret))
    assert r.status_code == 401
    assert r.json()["detail"] == "account deactivated"
    assert client.get("/label", follow_redirects=False).status_code == 303  # to /login

    r = client.patch("/api/v1/users/leaver", json={"active": True}, headers=h)
    assert r.json()["active"] is True
    assert client.get(next_task, headers=auth(secret)).status_code == 404


def test_patch_refuses_bad_input_unknown_users_and_self_deactivation(client, session):
    admin = make_user(session, role=Role.admin, username="boss")
    h = auth(make_token(session, admin))
    make_user(session, username="someone")
    for bad in ({}, {"active": "maybe"}, {"active": False, "role": "admin"}):
        r = client.patch("/api/v1/users/someone", json=bad, headers=h)
        assert r.status_code == 422, bad
    assert (
        client.patch("/api/v1/users/nobody", json={"active": False}, headers=h).status_code == 404
    )
    r = client.patch("/api/v1/users/boss", json={"active": False}, headers=h)
    assert r.status_code == 409
    assert "your own account" in r.json()["detail"]
    session.expire_all()
    assert session.get(User, admin.id).active is True


def test_a_token_is_read_once_within_the_cache_time(client, session, settings):
    assert settings.token_cache_seconds == 5
    headers = make_admin_headers(session)
    reads: list[str] = []

    def token_reads(_conn, _cursor, statement, *_):
        if "FROM api_token" in statement:
            reads.append(statement)

    engine = session.get_bind().engine
    event.listen(engine, "before_cursor_execute", token_reads)
    try:
        for _ in range(3):
            assert client.get("/api/v1/projects", headers=headers).status_code == 200
        assert len(reads) == 1
        client.app.state.token_cache = users.TokenCache(0)  # PREFERO_TOKEN_CACHE_SECONDS=0
        for _ in range(3):
            assert client.get("/api/v1/projects", headers=headers).status_code == 200
        assert len(reads) == 4
    finally:
        event.remove(engine, "before_cursor_execute", token_reads)
