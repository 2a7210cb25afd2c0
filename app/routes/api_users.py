"""/api/v1 users and API tokens (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.deps import AdminUser, SessionDep
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

router = APIRouter(prefix="/api/v1", tags=["users"])


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserRead)
def create_user(data: UserCreate, session: SessionDep, _: AdminUser) -> UserRead:
    return users.create_user(
        session, username=data.username, role=data.role, password=data.password
    )


@router.get("/users", response_model=list[UserRead])
def list_users(session: SessionDep, _: AdminUser) -> list[UserRead]:
    return users.list_users(session)


@router.patch("/users/{username}", response_model=UserRead)
def update_user(username: str, data: UserUpdate, session: SessionDep, admin: AdminUser) -> UserRead:
    """Deactivate or reactivate an account (an admin cannot deactivate itself: 409)."""
    return users.set_user_active(session, username=username, active=data.active, actor_id=admin.id)


@router.get("/users/{username}/tokens", response_model=list[TokenRead])
def list_tokens(username: str, session: SessionDep, _: AdminUser) -> list[TokenRead]:
    return users.list_tokens(session, username=username)


@router.post(
    "/users/{username}/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated
)
def create_token(
    username: str, data: TokenCreate, session: SessionDep, _: AdminUser
) -> TokenCreated:
    token, secret = users.create_token(session, username=username, name=data.name)
    return TokenCreated(**TokenRead.model_validate(token).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _: AdminUser
) -> Response:
    users.revoke_token(session, token_id=token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
