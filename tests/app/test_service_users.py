"""Accounts for the admin pages: deactivate/reactivate (sessions end, tokens refused), revoke a
user's own token, the users with their counts (on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.errors import Conflict, NotFound, Unauthenticated
from app.models import ApiToken, Role, WebSession, utcnow
from app.security import hash_token
from app.services import users
from app.services.auth_sessions import authenticate_session
from tests.factories import count, make_token, make_user


def open_session(session, user, *, secret: str = "cookie", expired: bool = False) -> str:
    now = utcnow()
    session.add(
        WebSession(
            token_hash=hash_token(secret),
            user_id=user.id,
            csrf_token="csrf",
            created_at=now,
            expires_at=now + (timedelta(hours=-1) if expired else timedelta(hours=1)),
        )
    )
    session.commit()
    return secret


def test_deactivation_ends_sessions_and_refuses_tokens_until_reactivated(session):
    user = make_user(session, username="quits")
    other = make_user(session)
    secret = make_token(session, user)
    cookie = open_session(session, user)
    open_session(session, other, secret="other-cookie")
    assert authenticate_session(session, token=cookie).user.id == user.id
    assert users.authenticate_token(session, secret=secret).id == user.id

    got = users.set_user_active(session, username="quits", active=False)
    assert got.active is False
    assert count(session, WebSession) == 1  # the other user's session stays
    with pytest.raises(Unauthenticated):
        authenticate_session(session, token=cookie)
    with pytest.raises(Unauthenticated, match="deactivated"):
        users.authenticate_token(session, secret=secret)

    users.set_user_active(session, username="quits", active=True)
    assert users.authenticate_token(session, secret=secret).id == user.id
    with pytest.raises(Unauthenticated):  # the ended session does not come back
        authenticate_session(session, token=cookie)


def test_set_user_active_refuses_self_deactivation_and_unknown_users(session):
    admin = make_user(session, role=Role.admin)
    with pytest.raises(Conflict):
        users.set_user_active(session, username=admin.username, active=False, actor_id=admin.id)
    session.expire_all()
    assert admin.active is True
    # Reactivating yourself is harmless (and impossible in practice).
    assert users.set_user_active(session, username=admin.username, active=True, actor_id=admin.id)
    with pytest.raises(NotFound):
        users.set_user_active(session, username="nobody", active=False)


def test_revoke_user_token_only_revokes_the_users_own_tokens(session):
    owner = make_user(session, username="owner")
    stranger = make_user(session, username="stranger")
    make_token(session, owner, name="mine")
    token = session.query(ApiToken).filter_by(user_id=owner.id).one()
    with pytest.raises(NotFound):
        users.revoke_user_token(session, username="stranger", token_id=token.id)
    session.expire_all()
    assert session.get(ApiToken, token.id).revoked_at is None
    revoked = users.revoke_user_token(session, username="owner", token_id=token.id)
    assert revoked.revoked_at is not None
    first = revoked.revoked_at
    again = users.revoke_user_token(session, username="owner", token_id=token.id)
    assert again.revoked_at == first  # idempotent
    assert stranger.active


def test_user_summaries_count_live_tokens_and_sessions(session):
    busy = make_user(session, username="busy")
    idle = make_user(session, username="idle")
    make_token(session, busy)
    make_token(session, busy)
    make_token(session, busy, name="old")
    old = session.query(ApiToken).filter_by(user_id=busy.id, name="old").one()
    users.revoke_user_token(session, username="busy", token_id=old.id)
    open_session(session, busy)
    open_session(session, busy, secret="stale", expired=True)
    got = {s.user.username: s for s in users.list_user_summaries(session)}
    assert (got["busy"].active_tokens, got["busy"].web_sessions) == (2, 1)
    assert (got["idle"].active_tokens, got["idle"].web_sessions) == (0, 0)
    user, tokens = users.user_with_tokens(session, username="busy")
    assert user.id == busy.id
    assert [t.name for t in tokens] == ["test", "test", "old"]
    assert idle.id != busy.id


# --------------------------------------------------------------------------- token cache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def revoke_behind_its_back(session, user) -> None:
    """Revoke the user's tokens in the database only (another process would)."""
    for token in session.query(ApiToken).filter_by(user_id=user.id):
        token.revoked_at = utcnow()
    session.commit()


def test_a_checked_token_is_trusted_for_the_cache_time_then_read_again(session):
    user = make_user(session)
    secret = make_token(session, user)
    clock = Clock()
    cache = users.TokenCache(5, timer=clock)
    assert users.authenticate_token(session, secret=secret, cache=cache).id == user.id
    assert len(cache) == 1
    revoke_behind_its_back(session, user)
    clock.now = 4.9  # not read again: a revocation by another process is not seen yet
    got = users.authenticate_token(session, secret=secret, cache=cache)
    assert (got.id, got.username, got.role, got.active) == (user.id, user.username, user.role, True)
    clock.now = 5.1
    with pytest.raises(Unauthenticated, match="revoked"):
        users.authenticate_token(session, secret=secret, cache=cache)
    assert cache.get(hash_token(secret)) is None  # refusals are never cached


def test_revoking_or_deactivating_in_this_process_is_refused_at_once(session):
    user = make_user(session, username="cached")
    secret = make_token(session, user)
    cache = users.TokenCache(3600)
    assert users.authenticate_token(session, secret=secret, cache=cache).id == user.id
    users.set_user_active(session, username="cached", active=False)
    with pytest.raises(Unauthenticated, match="deactivated"):
        users.authenticate_token(session, secret=secret, cache=cache)
    users.set_user_active(session, username="cached", active=True)
    assert users.authenticate_token(session, secret=secret, cache=cache).id == user.id
    token = session.query(ApiToken).filter_by(user_id=user.id).one()
    users.revoke_token(session, token_id=token.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        users.authenticate_token(session, secret=secret, cache=cache)


def test_a_check_read_before_a_revocation_is_not_kept_after_it(session):
    user = make_user(session)
    secret = make_token(session, user)
    cache = users.TokenCache(3600)
    read_in = cache.generation  # a request reads the token (still valid) ...
    checked = users.authenticate_token(session, secret=secret)
    row = users.CheckedToken(
        1, None, checked.id, checked.username, checked.role, True, checked.created_at
    )
    users.forget_checked_tokens()  # ... a revocation commits and clears the caches ...
    cache.put(hash_token(secret), row, read_in=read_in)  # ... then the request would keep it
    assert len(cache) == 0
    assert cache.get(hash_token(secret)) is None


def test_no_cache_when_its_time_is_zero(session):
    user = make_user(session)
    secret = make_token(session, user)
    cache = users.TokenCache(0)
    assert users.authenticate_token(session, secret=secret, cache=cache).id == user.id
    assert len(cache) == 0
    revoke_behind_its_back(session, user)
    with pytest.raises(Unauthenticated, match="revoked"):
        users.authenticate_token(session, secret=secret, cache=cache)


def test_a_cached_token_still_records_its_use_once_a_minute(session, monkeypatch):
    user = make_user(session)
    secret = make_token(session, user)
    cache = users.TokenCache(3600)
    users.authenticate_token(session, secret=secret, cache=cache)
    token = session.query(ApiToken).filter_by(user_id=user.id).one()
    first = token.last_used_at
    assert first is not None
    later = utcnow() + timedelta(minutes=2)
    monkeypatch.setattr(users, "utcnow", lambda: later)
    users.authenticate_token(session, secret=secret, cache=cache)
    session.refresh(token)
    assert token.last_used_at == later
    users.authenticate_token(session, secret=secret, cache=cache)  # cached use: no write
    assert cache.get(hash_token(secret)).last_used_at == later
