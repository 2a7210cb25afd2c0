"""Prompts for the admin pages: the browser's page with counts and the prompt view with
labelled completions and annotations (on SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from app.errors import InvalidInput, NotFound
from app.models import AnnotationStatus
from app.services import prompts
from tests.factories import make_annotation, make_project, make_prompt, make_user


def test_completion_labels():
    assert [prompts.completion_label(i) for i in (0, 1, 25, 26, 30)] == ["A", "B", "Z", "27", "31"]


def test_browse_prompts_pages_with_counts(session):
    project = make_project(session)
    made = [make_prompt(session, project, k=k, text=f"q{k}") for k in (2, 3, 4)]
    make_annotation(session, made[1], make_user(session))
    first = prompts.browse_prompts(session, project_slug=project.slug, after=None, limit=2)
    assert first.first
    assert first.project.prompt_count == 3
    assert [(p.id, p.completion_count, p.annotation_count) for p in first.items] == [
        (made[0].id, 2, 0),
        (made[1].id, 3, 1),
    ]
    assert first.items[0].text == "q2"
    rest = prompts.browse_prompts(session, project_slug=project.slug, after=first.next, limit=2)
    assert not rest.first
    assert [p.id for p in rest.items] == [made[2].id]
    assert rest.next is None
    with pytest.raises(InvalidInput):
        prompts.browse_prompts(session, project_slug=project.slug, after="-1", limit=2)
    with pytest.raises(NotFound):
        prompts.browse_prompts(session, project_slug="nope", after=None, limit=2)


def test_prompt_view_labels_rankings_and_marks_superseded_revisions(session):
    project = make_project(session)
    prompt = make_prompt(session, project, k=3)
    a, b, c = (x.id for x in prompt.completions)
    user = make_user(session, username="ann")
    make_annotation(
        session,
        prompt,
        user,
        ranking=[[b], [a, c]],
        likert={str(c): 1, str(a): 5},
        flags={str(a): [], str(b): ["off-topic", "harmful"]},
        display_order=[c, a, b],
    )
    make_annotation(session, prompt, user, revision=2, ranking=[[a], [b], [c], [999]])
    make_annotation(
        session,
        prompt,
        make_user(session),
        status=AnnotationStatus.skipped,
        ranking=[],
        display_order=[],
        skip_reason="too long",
    )
    view = prompts.prompt_view(session, project_slug=project.slug, prompt_id=prompt.id)
    assert [c.label for c in view.completions] == ["A", "B", "C"]
    first, second, skipped = view.annotations
    assert first.username == "ann"
    assert first.ranking == [["B"], ["A", "C"]]
    assert first.likert == [("A", 5), ("C", 1)]  # in the completions' order
    assert first.flags == [("B", ["off-topic", "harmful"])]  # empty flag lists left out
    assert first.shown == ["C", "A", "B"]
    assert (first.superseded, second.superseded, skipped.superseded) == (True, False, False)
    assert second.ranking == [["A"], ["B"], ["C"], ["#999"]]  # an unknown id stays visible
    assert skipped.skipped
    assert skipped.annotation.skip_reason == "too long"
    other = make_project(session)
    with pytest.raises(NotFound):
        prompts.prompt_view(session, project_slug=other.slug, prompt_id=prompt.id)
