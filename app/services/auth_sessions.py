"""Browser logins: server-side sessions (revocable, shared by every app process) and the
failed-login rate limit (per username and per client IP, counted in the database so it holds
across processes)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import TooManyRequests, Unauthenticated
from app.models import LoginFailure, User, WebSession, utcnow
from app.security import hash_token, verify_password
from app.services.transactions import write_transaction
from app.services.users import user_from_row

RATE_WINDOW = timedelta(minutes=1)
FAILURE_RETENTION = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: int
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class WebLogin:
    user: User
    session: SessionInfo


_S, _U = WebSession.__table__, User.__table__
_SESSION_OWNER = (
    select(
        _S.c.id.label("session_id"),
        _S.c.csrf_token,
        _S.c.expires_at,
        _U.c.id,
        _U.c.username,
        _U.c.role,
        _U.c.active,
        _U.c.created_at,
    )
    .join(_U, _S.c.user_id == _U.c.id)
    .where(_S.c.token_hash == bindparam("token_hash"))
)


def login(
    session: Session, *, username: str, password: str, ip: str, settings: Settings
) -> tuple[WebSession, str]:
    """Check the password and open a session; returns the row and the cookie secret.

    After ``settings.login_max_failures`` failures within a minute for this username or from
    this IP, every attempt (right or wrong) gets :class:`TooManyRequests` until the window
    has passed."""
    username = username[:200]
    ip = (ip or "unknown")[:64]
    now = utcnow()
    since = now - RATE_WINDOW
    recent = select(func.count()).where(LoginFailure.created_at > since)
    by_user = session.scalar(recent.where(LoginFailure.username == username)) or 0
    by_ip = session.scalar(recent.where(LoginFailure.ip == ip)) or 0
    if max(by_user, by_ip) >= settings.login_max_failures:
        session.rollback()
        raise TooManyRequests("too many failed logins: wait a minute and try again", retry_after=60)

    user = session.scalar(select(User).where(User.username == username))
    session.rollback()  # argon2 takes a while: hold no transaction meanwhile
    ok = verify_password(user.password_hash if user else None, password)
    if not ok or user is None or not user.active:
        write_transaction(session)
        session.add(LoginFailure(username=username, ip=ip, created_at=now))
        session.execute(
            delete(LoginFailure).where(LoginFailure.created_at < now - FAILURE_RETENTION)
        )
        session.commit()
        raise Unauthenticated("wrong username or password")

    secret = secrets.token_urlsafe(32)
    write_transaction(session)
    session.execute(
        delete(WebSession).where(WebSession.user_id == user.id, WebSession.expires_at <= now)
    )
    web_session = WebSession(
        token_hash=hash_token(secret),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + timedelta(seconds=settings.session_max_age_s),
    )
    session.add(web_session)
    session.commit()
    return web_session, secret


def authenticate_session(session: Session, *, token: str) -> WebLogin:
    """The active user of an unexpired session cookie, or :class:`Unauthenticated`."""
    row = session.connection().execute(_SESSION_OWNER, {"token_hash": hash_token(token)}).first()
    if row is None:
        raise Unauthenticated("not logged in")
    if row.expires_at <= utcnow():
        raise Unauthenticated("session expired: log in again")
    if not row.active:
        raise Unauthenticated("account deactivated")
    return WebLogin(
        user=user_from_row(row),
        session=SessionInfo(
            id=row.session_id, csrf_token=row.csrf_token, expires_at=row.expires_at
        ),
    )


def logout(session: Session, *, token: str) -> None:
    write_transaction(session)
    session.execute(delete(WebSession).where(WebSession.token_hash == hash_token(token)))
    session.commit()
