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
