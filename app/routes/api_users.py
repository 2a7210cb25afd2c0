"""/api/v1 users and API tokens (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.deps import AdminUser, PageLimit, PageOffset, SessionDep
from app.routes._responses import AUTHENTICATED, errors
from app.schemas import (
    MAX_ID,
    TokenCreate,
    TokenCreated,
    TokenRead,
    UserCreate,
    UserRead,
    UserUpdate,
)
from app.services import users

router = APIRouter(prefix="/api/v1", tags=["users"], responses=AUTHENTICATED)


@router.post(
    "/users",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
    responses=errors(400, 409, 413, 422),
)
def create_user(data: UserCreate, session: SessionDep, admin: AdminUser) -> UserRead:
    return users.create_user(
        session, username=data.username, role=data.role, password=data.password, actor=admin
    )


@router.get("/users", response_model=list[UserRead], responses=errors(422))
def list_users(
    session: SessionDep, _: AdminUser, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[UserRead]:
    return users.list_users(session, limit=limit, offset=offset)


@router.patch(
    "/users/{username}", response_model=UserRead, responses=errors(400, 404, 409, 413, 422)
)
def update_user(username: str, data: UserUpdate, session: SessionDep, admin: AdminUser) -> UserRead:
    """Deactivate or reactivate an account (an admin cannot deactivate itself: 409)."""
    return users.set_user_active(session, username=username, active=data.active, actor=admin)


@router.get("/users/{username}/tokens", response_model=list[TokenRead], responses=errors(404, 422))
def list_tokens(
    username: str,
    session: SessionDep,
    _: AdminUser,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> list[TokenRead]:
    return users.list_tokens(session, username=username, limit=limit, offset=offset)


@router.post(
    "/users/{username}/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses=errors(400, 404, 409, 413, 422),
)
def create_token(
    username: str, data: TokenCreate, session: SessionDep, admin: AdminUser
) -> TokenCreated:
    token, secret = users.create_token(session, username=username, name=data.name, actor=admin)
    return TokenCreated(**TokenRead.model_validate(token).model_dump(), token=secret)


@router.delete(
    "/tokens/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409, 422),
)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, admin: AdminUser
) -> Response:
    users.revoke_token(session, token_id=token_id, actor=admin)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
