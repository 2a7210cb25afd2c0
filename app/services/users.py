"""Accounts and API tokens, and resolving a bearer token to its user."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from cachetools import TTLCache
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, Unauthenticated
from app.models import ApiToken, Role, User, WebSession, utcnow
from app.security import hash_password, hash_token, new_token
from app.services import audit
from app.services.transactions import write_transaction

LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``api_token.last_used_at`` is refreshed at most this often, keeping writes off hot paths."""


def get_user(session: Session, *, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"user {username!r} not found")
    return user


def create_user(
    session: Session,
    *,
    username: str,
    role: Role,
    password: str | None = None,
    actor: User | None = None,
) -> User:
    """Create an account; ``actor`` (None: the command line) is recorded in the audit log."""
    # Hash before the transaction starts: argon2 is deliberately slow.
    password_hash = hash_password(password) if password else None
    write_transaction(session)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        session.rollback()
        raise Conflict(f"user {username!r} already exists")
    user = User(username=username, role=role, password_hash=password_hash, active=True)
    session.add(user)
    try:
        session.flush()
        audit.record_user(
            session,
            actor=actor,
            action="user.create",
            user=user,
            role=role.value,
            can_log_in=bool(password_hash),
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"user {username!r} already exists") from None
    return user


def list_users(session: Session, *, limit: int | None = None, offset: int = 0) -> list[User]:
    """Users by id; ``limit``/``offset`` page through them (None: all)."""
    return list(session.scalars(select(User).order_by(User.id).limit(limit).offset(offset)))


def create_token(
    session: Session, *, username: str, name: str = "api", actor: User | None = None
) -> tuple[ApiToken, str]:
    """Create a token for ``username``; returns the row and the secret (shown once, and
    never in the audit log, which records the token's id and name)."""
    write_transaction(session)
    user = get_user(session, username=username)
    secret = new_token()
    token = ApiToken(user_id=user.id, name=name, token_hash=hash_token(secret))
    session.add(token)
    session.flush()
    audit.record_user(
        session, actor=actor, action="token.create", user=user, token_id=token.id, name=name
    )
    session.commit()
    return token, secret


def _revoke(session: Session, actor: User | None, token: ApiToken, owner: User) -> None:
    was_revoked = token.revoked_at is not None
    if not was_revoked:
        token.revoked_at = utcnow()
    audit.record_user(
        session,
        actor=actor,
        action="token.revoke",
        user=owner,
        token_id=token.id,
        name=token.name,
        already_revoked=was_revoked,
    )


def revoke_token(session: Session, *, token_id: int, actor: User | None = None) -> ApiToken:
    write_transaction(session)
    token = session.get(ApiToken, token_id)
    if token is None:
        session.rollback()
        raise NotFound(f"token {token_id} not found")
    _revoke(session, actor, token, token.user)
    session.commit()
    forget_checked_tokens()
    return token


_T, _U = ApiToken.__table__, User.__table__
_USER_COLUMNS = (_U.c.id, _U.c.username, _U.c.role, _U.c.active, _U.c.created_at)
_TOKEN_OWNER = (
    select(_T.c.id.label("token_id"), _T.c.revoked_at, _T.c.last_used_at, *_USER_COLUMNS)
    .join(_U, _T.c.user_id == _U.c.id)
    .where(_T.c.token_hash == bindparam("token_hash"))
)


def user_from_row(row: Any) -> User:
    """A detached ``User`` from a row with the user columns: the caller on every request,
    built without an ORM load (it is only read, never added to a session)."""
    return User(
        id=row.id,
        username=row.username,
        role=row.role,
        active=row.active,
        created_at=row.created_at,
    )


class CheckedToken(NamedTuple):
    """A valid token's id and last use, and its owner's columns (see :func:`user_from_row`)."""

    token_id: int
    last_used_at: datetime | None
    id: int
    username: str
    role: Role
    active: bool
    created_at: datetime


class TokenCache:
    """Bearer tokens this process checked in the last ``seconds``: the owner's columns and the
    token's id, keyed by the token's hash, so that most requests of an API client (two per
    labeled task) are authenticated without a database round trip.

    What it trades: a token revoked or an account deactivated *by this process* is forgotten at
    once (:func:`forget_checked_tokens` clears every cache of the process), but another process
    (another ``prefero serve`` worker, the command line) may accept it for up to ``seconds``
    more. ``seconds`` 0 turns the cache off. Thread-safe; at most ``maxsize`` tokens (expired
    ones go first, then the least recently used). Browser sessions are not cached: logging out
    ends one at once."""

    def __init__(
        self, seconds: float, *, maxsize: int = 10_000, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._tokens: TTLCache[str, CheckedToken] | None = (
            TTLCache(maxsize=maxsize, ttl=seconds, timer=timer) if seconds > 0 else None
        )
        # bumped by clear(): a row read from the database before a clear is not put back
        self.generation = 0
        _token_caches.add(self)

    def get(self, token_hash: str) -> CheckedToken | None:
        if self._tokens is None:
            return None
        with self._lock:
            return self._tokens.get(token_hash)

    def put(self, token_hash: str, row: CheckedToken, *, read_in: int) -> None:
        """Keep ``row``, read while :attr:`generation` was ``read_in``, unless the cache was
        cleared since (a revocation committed after the read)."""
        if self._tokens is not None:
            with self._lock:
                if self.generation == read_in:
                    self._tokens[token_hash] = row

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            if self._tokens is not None:
                self._tokens.clear()

    def __len__(self) -> int:
        return len(self._tokens) if self._tokens is not None else 0


_token_caches: weakref.WeakSet[TokenCache] = weakref.WeakSet()


def forget_checked_tokens() -> None:
    """Clear every :class:`TokenCache` of this process: after a token is revoked or an account
    deactivated (or reactivated), its next request is checked against the database."""
    for cache in list(_token_caches):
        cache.clear()


def authenticate_token(session: Session, *, secret: str, cache: TokenCache | None = None) -> User:
    """The active user owning an unrevoked token, or :class:`Unauthenticated`. With
    ``cache``, a token checked within its ``seconds`` is not read again (see
    :class:`TokenCache`)."""
    token_hash = hash_token(secret)
    generation = cache.generation if cache is not None else 0
    row = cache.get(token_hash) if cache is not None else None
    if row is None:
        row = session.connection().execute(_TOKEN_OWNER, {"token_hash": token_hash}).first()
        if row is None:
            raise Unauthenticated("invalid token")
        if row.revoked_at is not None:
            raise Unauthenticated("token revoked")
        if not row.active:
            raise Unauthenticated("account deactivated")
        row = CheckedToken(
            row.token_id, row.last_used_at, row.id, row.username, row.role, True, row.created_at
        )
        if cache is not None:
            cache.put(token_hash, row, read_in=generation)
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        _touch_token(session, token_id=row.token_id, now=now)
        if cache is not None:
            cache.put(token_hash, row._replace(last_used_at=now), read_in=generation)
    return user_from_row(row)


def cached_token_user(*, secret: str, cache: TokenCache | None) -> User | None:
    """The user of a token ``cache`` checked within its time and whose last use is recorded
    within :data:`LAST_USED_RESOLUTION`: what :func:`authenticate_token` would return without
    touching the database. None: call :func:`authenticate_token`."""
    if cache is None:
        return None
    row = cache.get(hash_token(secret))
    if (
        row is None
        or row.last_used_at is None
        or utcnow() - row.last_used_at > LAST_USED_RESOLUTION
    ):
        return None
    return user_from_row(row)


def _touch_token(session: Session, *, token_id: int, now: datetime) -> None:
    """Record the token's use. Best effort: a busy database must not fail the request."""
    try:
        write_transaction(session)
        session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))
        session.commit()
    except OperationalError:
        session.rollback()


def list_tokens(
    session: Session, *, username: str, limit: int | None = None, offset: int = 0
) -> list[ApiToken]:
    user = get_user(session, username=username)
    query = select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    return list(session.scalars(query.limit(limit).offset(offset)))


# --------------------------------------------------------------------------- admin pages


@dataclass(frozen=True, slots=True)
class UserSummary:
    """A user as the admin pages list it: with its unrevoked tokens and live browser sessions."""

    user: User
    active_tokens: int
    web_sessions: int


def list_user_summaries(session: Session) -> list[UserSummary]:
    """Every user with its counts, oldest first (three queries however many users)."""
    users = list_users(session)
    tokens = dict(
        session.execute(
            select(ApiToken.user_id, func.count())
            .where(ApiToken.revoked_at.is_(None))
            .group_by(ApiToken.user_id)
        ).all()
    )
    sessions = dict(
        session.execute(
            select(WebSession.user_id, func.count())
            .where(WebSession.expires_at > utcnow())
            .group_by(WebSession.user_id)
        ).all()
    )
    return [UserSummary(u, tokens.get(u.id, 0), sessions.get(u.id, 0)) for u in users]


def user_with_tokens(session: Session, *, username: str) -> tuple[User, list[ApiToken]]:
    """The user and all its tokens (revoked ones too), oldest first."""
    user = get_user(session, username=username)
    query = select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    return user, list(session.scalars(query))


def set_user_active(
    session: Session,
    *,
    username: str,
    active: bool,
    actor: User | None = None,
    actor_id: int | None = None,
) -> User:
    """Deactivate or reactivate an account. Deactivating ends its browser sessions at once
    (their rows are deleted); its tokens stay but are refused while it is inactive, and so is
    logging in. ``actor``, the user making the change (recorded in the audit log; None: the
    command line), may not deactivate itself; ``actor_id`` alone checks that too."""
    write_transaction(session)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        session.rollback()
        raise NotFound(f"user {username!r} not found")
    if actor_id is None and actor is not None:
        actor_id = actor.id
    if not active and actor_id is not None and user.id == actor_id:
        session.rollback()
        raise Conflict("you cannot deactivate your own account")
    was_active = user.active
    user.active = active
    ended = 0
    if not active:
        ended = session.execute(delete(WebSession).where(WebSession.user_id == user.id)).rowcount
    action = "user.activate" if active else "user.deactivate"
    audit.record_user(
        session, actor=actor, action=action, user=user, was_active=was_active, sessions_ended=ended
    )
    session.commit()
    forget_checked_tokens()
    return user


def revoke_user_token(
    session: Session, *, username: str, token_id: int, actor: User | None = None
) -> ApiToken:
    """Revoke ``username``'s token ``token_id`` (:class:`NotFound` if it is not theirs)."""
    write_transaction(session)
    token = session.scalar(
        select(ApiToken)
        .join(User, ApiToken.user_id == User.id)
        .where(ApiToken.id == token_id, User.username == username)
    )
    if token is None:
        session.rollback()
        raise NotFound(f"user {username!r} has no token {token_id}")
    _revoke(session, actor, token, token.user)
    session.commit()
    forget_checked_tokens()
    return token
