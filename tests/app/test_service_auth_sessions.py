"""Browser login sessions and the failed-login rate limit, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.config import Settings
from app.errors import TooManyRequests, Unauthenticated
from app.models import LoginFailure, User, WebSession, utcnow
from app.security import hash_token
from app.services import auth_sessions
from tests.factories import PASSWORD, count, make_user


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, secret_key="x", login_max_failures=3)


def login(session, settings, username, password=PASSWORD, ip="10.0.0.1"):
    return auth_sessions.login(
        session, username=username, password=password, ip=ip, settings=settings
    )


def test_login_opens_a_session_the_cookie_resolves(session, settings):
    user = make_user(session)
    row, secret = login(session, settings, user.username)
    assert row.token_hash == hash_token(secret)  # only the hash is stored
    assert len(row.csrf_token) >= 32
    web = auth_sessions.authenticate_session(session, token=secret)
    assert web.user.id == user.id
    assert web.session.csrf_token == row.csrf_token

    auth_sessions.logout(session, token=secret)
    with pytest.raises(Unauthenticated):
        auth_sessions.authenticate_session(session, token=secret)


def test_wrong_password_unknown_user_and_inactive_account(session, settings):
    user = make_user(session)
    inactive = make_user(session, active=False)
    for name, password in (
        (user.username, "wrong"),
        ("nobody", PASSWORD),
        (inactive.username, PASSWORD),
    ):
        with pytest.raises(Unauthenticated, match="wrong username or password"):
            login(session, settings, name, password, ip=f"10.0.0.{len(name)}")
    assert count(session, WebSession) == 0
    assert count(session, LoginFailure) == 3


def test_expired_session_and_deactivated_user_are_rejected(session, settings):
    user = make_user(session)
    _, secret = login(session, settings, user.username)
    session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    with pytest.raises(Unauthenticated, match="expired"):
        auth_sessions.authenticate_session(session, token=secret)

    _, secret = login(session, settings, user.username)
    session.execute(update(User).where(User.id == user.id).values(active=False))
    session.commit()
    with pytest.raises(Unauthenticated, match="deactivated"):
        auth_sessions.authenticate_session(session, token=secret)


def test_rate_limit_per_username(session, settings):
    user = make_user(session)
    for i in range(3):
        with pytest.raises(Unauthenticated):
            login(session, settings, user.username, "wrong", ip=f"10.1.0.{i}")
    # Even the right password is refused while the limit holds, from any address.
    with pytest.raises(TooManyRequests):
        login(session, settings, user.username, ip="10.9.9.9")
    # Failures older than a minute no longer count.
    session.execute(update(LoginFailure).values(created_at=utcnow() - timedelta(seconds=61)))
    session.commit()
    assert login(session, settings, user.username)[0].user_id == user.id


def test_rate_limit_per_ip(session, settings):
    user = make_user(session)
    for i in range(3):
        with pytest.raises(Unauthenticated):
            login(session, settings, f"guess{i}", "wrong", ip="10.2.0.1")
    with pytest.raises(TooManyRequests):
        login(session, settings, user.username, ip="10.2.0.1")
    assert login(session, settings, user.username, ip="10.2.0.2")[0].user_id == user.id
