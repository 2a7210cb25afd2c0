"""The admin pages for users and tokens: create a user (field errors), deactivate (sessions end,
tokens refused) and reactivate, create a token (secret shown once) and revoke it; CSRF and
escaping (on SQLite and PostgreSQL, through the ASGI app)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import ApiToken, Role, User, WebSession
from app.security import verify_password
from tests.app.test_pages import assert_no_inline_code, log_in, logged_in
from tests.app.test_pages_admin import page_csrf
from tests.app.test_pages_admin_projects import field_error, flash
from tests.factories import auth, count, make_token, make_user


def admin(client, session):
    return logged_in(client, session, role=Role.admin)


def db_user(session, username: str) -> User:
    session.expire_all()
    user = session.scalar(select(User).where(User.username == username))
    assert user is not None
    return user


def test_the_users_page_lists_accounts_with_their_tokens_and_sessions(client, session):
    bob = make_user(session, username="bob")
    make_token(session, bob)
    make_user(session, username="<script>x</script>", active=False)
    me = admin(client, session)
    r = client.get("/admin/users")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert_no_inline_code(r.text)
    row = re.search(r'<tr id="user-bob".*?</tr>', r.text, re.S).group(0)
    assert re.search(r'data-field="active_tokens">1<', row)
    assert re.search(r'data-field="status">Active<', row)
    assert 'aria-label="Deactivate bob"' in row
    assert "<script>x" not in r.text
    assert "Reactivate &lt;script&gt;x&lt;/script&gt;" in r.text
    mine = re.search(rf'<tr id="user-{me.username}".*?</tr>', r.text, re.S).group(0)
    assert "Deactivate" not in mine  # no button to lock yourself out
    assert re.search(r'data-field="web_sessions">1<', mine)


def test_create_a_user(client, session):
    admin(client, session)
    csrf = page_csrf(client.get("/admin/users").text)
    r = client.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "carol", "role": "admin", "password": "long enough"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/admin/users#user-carol"
    user = db_user(session, "carol")
    assert user.role == Role.admin
    assert verify_password(user.password_hash, "long enough")
    assert flash(client.get("/admin/users").text) == "User “carol” created."
    # Without a password: a token-only account.
    r = client.post(
        "/admin/users", data={"csrf_token": csrf, "username": "bot", "role": "annotator"}
    )
    assert r.status_code == 200
    assert db_user(session, "bot").password_hash is None


def test_invalid_users_are_refused_next_to_the_fields(client, session):
    make_user(session, username="taken")
    admin(client, session)
    csrf = page_csrf(client.get("/admin/users").text)
    before = count(session, User)
    r = client.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "has space", "role": "root", "password": "short"},
    )
    assert r.status_code == 422
    assert "letters, digits" in field_error(r.text, "username")
    assert field_error(r.text, "password") == "At least 8 characters."
    assert field_error(r.text, "role")
    assert 'value="has space"' in r.text
    assert "short" not in re.sub(r"minlength|password-hint|At least", "", r.text.split("<form")[2])
    r = client.post("/admin/users", data={"csrf_token": csrf, "username": "taken", "role": "admin"})
    assert r.status_code == 409
    assert field_error(r.text, "username") == "A user with this name already exists."
    assert count(session, User) == before


def test_deactivating_ends_sessions_and_tokens_and_reactivating_restores(app, client, session):
    annotator = make_user(session, username="ann")
    token = make_token(session, annotator)
    other = TestClient(app)
    assert log_in(other, "ann").status_code == 303
    assert other.get("/label").status_code == 200
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(token)).status_code == 404

    admin(client, session)
    csrf = page_csrf(client.get("/admin/users").text)
    r = client.post(
        "/admin/users/ann/active",
        data={"csrf_token": csrf, "active": "0"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/admin/users#user-ann"
    assert db_user(session, "ann").active is False
    assert count(session, WebSession) == 1  # only the admin's
    page = client.get("/admin/users").text
    assert flash(page).startswith("“ann” is deactivated")
    row = re.search(r'<tr id="user-ann".*?</tr>', page, re.S).group(0)
    assert re.search(r'data-field="status">Deactivated<', row)

    # The annotator's browser is logged out; the token is refused; logging in fails.
    r = other.get("/label", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login")
    r = client.get("/api/v1/projects/x/tasks/next", headers=auth(token))
    assert r.status_code == 401
    assert log_in(other, "ann").status_code != 303

    # Reactivated from the user's page: back there; the token works again.
    r = client.post(
        "/admin/users/ann/active",
        data={"csrf_token": csrf, "active": "1", "back": "user"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/admin/users/ann"
    assert flash(client.get("/admin/users/ann").text) == "“ann” is active again."
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(token)).status_code == 404


def test_an_admin_cannot_deactivate_itself_and_unknown_users_are_404(client, session):
    me = admin(client, session)
    csrf = page_csrf(client.get("/admin/users").text)
    r = client.post(f"/admin/users/{me.username}/active", data={"csrf_token": csrf, "active": "0"})
    assert r.status_code == 409
    assert "cannot deactivate your own account" in r.text
    assert db_user(session, me.username).active is True
    r = client.post("/admin/users/nobody/active", data={"csrf_token": csrf, "active": "0"})
    assert r.status_code == 404
    assert client.get("/admin/users/nobody").status_code == 404


def test_tokens_are_created_shown_once_and_revoked(client, session):
    bot = make_user(session, username="bot")
    admin(client, session)
    page = client.get("/admin/users/bot")
    assert page.status_code == 200
    assert "No tokens yet." in page.text
    csrf = page_csrf(page.text)
    r = client.post("/admin/users/bot/tokens", data={"csrf_token": csrf, "name": "ci <runner>"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert_no_inline_code(r.text)
    secret = re.search(
        r'id="token-secret" class="secret" type="text" readonly value="([^"]+)"', r.text
    )
    assert secret
    secret = secret.group(1)
    assert "ci &lt;runner&gt;" in r.text
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(secret)).status_code == 404
    token = session.scalar(select(ApiToken).where(ApiToken.user_id == bot.id))
    assert token.name == "ci <runner>"
    # Shown once: not on the next visit.
    assert secret not in client.get("/admin/users/bot").text

    r = client.post(
        f"/admin/users/bot/tokens/{token.id}/revoke",
        data={"csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/admin/users/bot#token-{token.id}"
    page = client.get(r.headers["location"]).text
    assert flash(page) == "Token “ci &lt;runner&gt;” revoked: it no longer works."
    assert re.search(r'data-field="status">Revoked \d{4}-', page)
    assert client.get("/api/v1/projects/x/tasks/next", headers=auth(secret)).status_code == 401
    # Another user's token cannot be revoked through this user.
    other = make_user(session)
    make_token(session, other)
    theirs = session.scalar(select(ApiToken).where(ApiToken.user_id == other.id))
    r = client.post(f"/admin/users/bot/tokens/{theirs.id}/revoke", data={"csrf_token": csrf})
    assert r.status_code == 404
    session.expire_all()
    assert session.get(ApiToken, theirs.id).revoked_at is None


def test_token_names_are_checked(client, session):
    make_user(session, username="bot")
    admin(client, session)
    csrf = page_csrf(client.get("/admin/users/bot").text)
    r = client.post("/admin/users/bot/tokens", data={"csrf_token": csrf, "name": "x" * 101})
    assert r.status_code == 422
    assert field_error(r.text, "name") == "At most 100 characters."
    assert count(session, ApiToken) == 0
    # An empty name is the API's default, "api".
    r = client.post("/admin/users/bot/tokens", data={"csrf_token": csrf, "name": ""})
    assert r.status_code == 200
    assert session.scalar(select(ApiToken.name)) == "api"


def test_user_forms_need_the_csrf_token(client, session):
    bot = make_user(session, username="bot")
    make_token(session, bot)
    token_id = session.scalar(select(ApiToken.id))
    admin(client, session)
    for csrf in ("", "forged"):
        posts = [
            ("/admin/users", {"username": "new", "role": "annotator"}),
            ("/admin/users/bot/active", {"active": "0"}),
            ("/admin/users/bot/tokens", {"name": "x"}),
            (f"/admin/users/bot/tokens/{token_id}/revoke", {}),
        ]
        for url, data in posts:
            r = client.post(url, data={"csrf_token": csrf, **data})
            assert r.status_code == 403, url
            assert "The form has expired" in r.text
    assert count(session, User) == 2
    assert db_user(session, "bot").active is True
    assert count(session, ApiToken) == 1
    session.expire_all()
    assert session.get(ApiToken, token_id).revoked_at is None
