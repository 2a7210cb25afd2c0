"""FastAPI dependencies as ``Annotated`` aliases: the session, the current user, the admin."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Forbidden, Unauthenticated
from app.models import Role, User
from app.observability import set_user_id
from app.services.auth_sessions import WebLogin, authenticate_session
from app.services.users import TokenCache, authenticate_token, cached_token_user

T = TypeVar("T")
WEB_SESSION_COOKIE = "prefero_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# The dependencies are ``async``: FastAPI runs each sync dependency in a thread of its own,
# and a request would hop threads four times. Only the database work hops: authentication
# (one thread, which then hands its connection back) and the endpoint (another).


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():  # a rollback is I/O: not on the event loop
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

_bearer = HTTPBearer(auto_error=False, description="An API token: `prefero tokens create USER`.")


_cookie = APIKeyCookie(
    name=WEB_SESSION_COOKIE,
    auto_error=False,
    description="The browser session set by /login; unsafe methods also need the "
    f"`{CSRF_HEADER}` header (the page's csrf-token meta tag).",
)


def _released(session: Session, fn: Callable[[], T]) -> T:
    """Run ``fn`` and end the session's transaction, so that its connection goes back to the
    pool while the request waits for the endpoint's thread."""
    try:
        return fn()
    finally:
        session.rollback()


async def current_user(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> User:
    """The caller: by bearer token, else by session cookie (with a CSRF check on writes)."""
    if credentials is not None:
        secret = credentials.credentials
        cache = request.app.state.token_cache
        user = await run_in_threadpool(
            _released, session, lambda: authenticate_token(session, secret=secret, cache=cache)
        )
        set_user_id(user.id)
        return user
    if cookie:
        login = await run_in_threadpool(
            _released, session, lambda: authenticate_session(session, token=cookie)
        )
        set_user_id(login.user.id)
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), login.session.csrf_token.encode()):
                raise Forbidden(f"missing or wrong {CSRF_HEADER} header")
        return login.user
    raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")


@dataclass(frozen=True, slots=True)
class Caller:
    """The request's credentials, checked later in the endpoint's own thread: the labeling
    routes (the hot path) then take one thread hop and one pooled connection per request."""

    bearer: str | None
    cookie: str | None
    unsafe_method: bool
    csrf_header: str
    token_cache: TokenCache | None = None

    def user(self, session: Session) -> User:
        if self.bearer is not None:
            user = authenticate_token(session, secret=self.bearer, cache=self.token_cache)
            set_user_id(user.id)
            return user
        if self.cookie:
            login = authenticate_session(session, token=self.cookie)
            set_user_id(login.user.id)
            if self.unsafe_method and not hmac.compare_digest(
                self.csrf_header.encode(), login.session.csrf_token.encode()
            ):
                raise Forbidden(f"missing or wrong {CSRF_HEADER} header")
            return login.user
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")

    def cached_user(self) -> User | None:
        """The bearer token's user when this process checked the token recently (see
        :func:`app.services.users.cached_token_user`), with no database work; else None
        (:meth:`user` checks it)."""
        if self.bearer is None:
            return None
        user = cached_token_user(secret=self.bearer, cache=self.token_cache)
        if user is not None:
            set_user_id(user.id)
        return user


async def caller(request: Request) -> Caller:
    """The credentials of a labeling request, read straight from its headers: the same
    bearer-then-cookie rules as :func:`current_user` (``HTTPBearer`` and ``APIKeyCookie``
    with ``auto_error=False``) without their two sub-dependencies, whose resolution FastAPI
    repeats on every request. The routes declare both schemes in OpenAPI
    (:data:`CALLER_SECURITY`)."""
    headers = request.headers
    scheme, bearer = get_authorization_scheme_param(headers.get("authorization"))
    if scheme.lower() != "bearer" or not bearer:
        bearer = None
    cookie = request.cookies.get(WEB_SESSION_COOKIE) or None
    if bearer is None and not cookie:  # anonymous: 401 before the body is even read
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")
    return Caller(
        bearer=bearer,
        cookie=cookie,
        unsafe_method=request.method not in SAFE_METHODS,
        csrf_header=headers.get(CSRF_HEADER, ""),
        token_cache=request.app.state.token_cache,
    )


CALLER_SECURITY: dict = {
    "security": [{_bearer.scheme_name: []}, {_cookie.scheme_name: []}],
}
"""``openapi_extra`` of the routes that take :data:`CallerDep`: what ``current_user``'s
security dependencies would declare."""


def request_session(request: Request) -> AbstractContextManager[Session]:
    """A session for the labeling routes, to open and close in the endpoint's own thread
    (``with request_session(request) as session:``): no generator dependency (FastAPI enters
    and leaves one through an exit stack on the event loop, every request) and the close (a
    rollback is I/O) off the event loop. ``app.state.open_session`` makes it: the session
    factory (a session closes when its ``with`` block ends); tests put their own there."""
    return request.app.state.open_session()


async def optional_web_login(request: Request, session: SessionDep) -> WebLogin | None:
    """The browser login of a page request, or None (the page redirects to /login)."""
    cookie = request.cookies.get(WEB_SESSION_COOKIE)
    if not cookie:
        return None
    try:
        login = await run_in_threadpool(
            _released, session, lambda: authenticate_session(session, token=cookie)
        )
    except Unauthenticated:
        return None
    set_user_id(login.user.id)
    return login


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != Role.admin:
        raise Forbidden("admin role required")
    return user


MAX_PAGE = 500
"""The most items one list request returns (``limit`` above it: 422)."""
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Items to return (1-{MAX_PAGE}).")]
PageOffset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]

CurrentUser = Annotated[User, Depends(current_user)]
CallerDep = Annotated[Caller, Depends(caller)]
OptionalWebUser = Annotated[WebLogin | None, Depends(optional_web_login)]
AdminUser = Annotated[User, Depends(admin_user)]
