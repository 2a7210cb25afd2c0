"""Project members service, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from app.errors import InvalidInput, NotFound
from app.models import ProjectMember
from app.services import members
from tests.factories import count, make_project, make_user


def test_add_list_remove(session):
    project = make_project(session, members_only=True)
    a, b = make_user(session, username="ann"), make_user(session, username="bob")
    assert members.add_members(session, slug=project.slug, usernames=["bob", "ann", "bob"]) == [
        "ann",
        "bob",
    ]
    assert members.add_members(session, slug=project.slug, usernames=["ann"]) == ["ann", "bob"]
    assert members.list_members(session, slug=project.slug) == ["ann", "bob"]
    assert members.remove_members(session, slug=project.slug, usernames=[a.username]) == [
        b.username
    ]


def test_unknown_users_change_nothing(session):
    project = make_project(session)
    make_user(session, username="carol")
    with pytest.raises(InvalidInput, match="'ghost'") as caught:
        members.add_members(session, slug=project.slug, usernames=["carol", "ghost"])
    assert caught.value.errors == [{"field": "usernames", "message": "no user 'ghost'"}]
    assert count(session, ProjectMember) == 0
    with pytest.raises(NotFound):
        members.add_members(session, slug="nope", usernames=["carol"])
