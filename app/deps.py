"""FastAPI dependencies as ``Annotated`` aliases: the session, the current user, the admin."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Forbidden, Unauthenticated
from app.models import Role, User
from app.services.users import authenticate_token


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

_bearer = HTTPBearer(auto_error=False, description="An API token: `prefero tokens create USER`.")


def current_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    if credentials is None:
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")
    return authenticate_token(session, secret=credentials.credentials)


def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != Role.admin:
        raise Forbidden("admin role required")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
