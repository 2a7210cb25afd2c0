"""Projects: the counts of every project at once (``list_project_details``), on SQLite and
PostgreSQL."""

from __future__ import annotations

from sqlalchemy import event

from app.models import AnnotationStatus
from app.services import projects
from tests.factories import make_annotation, make_project, make_prompt, make_user


def count_statements(session, call):
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        seen.append(statement)

    bind = session.connection()
    event.listen(bind, "before_cursor_execute", record)
    try:
        result = call()
    finally:
        event.remove(bind, "before_cursor_execute", record)
    return len(seen), result


def test_list_project_details_matches_project_detail(session):
    busy = make_project(session, name="Busy")
    prompts = [make_prompt(session, busy, k=4), make_prompt(session, busy, k=2)]
    user = make_user(session)
    make_annotation(session, prompts[0], user)
    make_annotation(session, prompts[1], make_user(session), status=AnnotationStatus.skipped)
    empty = make_project(session, name="Empty")
    details = {d.slug: d for d in projects.list_project_details(session)}
    for project in (busy, empty):
        assert details[project.slug] == projects.project_detail(session, slug=project.slug)
    got = details[busy.slug]
    assert (got.prompt_count, got.completion_count, got.annotation_count) == (2, 6, 2)
    assert (details[empty.slug].prompt_count, details[empty.slug].completion_count) == (0, 0)
    ids = [d.id for d in projects.list_project_details(session)]
    assert ids == sorted(ids)  # oldest first, as list_projects


def test_list_project_details_needs_four_queries_however_many_projects(session):
    make_prompt(session, make_project(session))
    few, _ = count_statements(session, lambda: projects.list_project_details(session))
    for _ in range(5):
        make_prompt(session, make_project(session), k=2)
    many, details = count_statements(session, lambda: projects.list_project_details(session))
    assert few == many == 4
    assert len(details) >= 6


def test_project_page_has_the_detail_and_the_members(session):
    from app.services import members

    project = make_project(session, members_only=True)
    for name in ("zoe", "adam"):
        make_user(session, username=name)
    make_user(session, username="outsider")
    members.add_members(session, slug=project.slug, usernames=["zoe", "adam"])
    page = projects.project_page(session, slug=project.slug)
    assert page.project == projects.project_detail(session, slug=project.slug)
    assert page.members == ["adam", "zoe"]
    assert projects.project_page(session, slug=make_project(session).slug).members == []
