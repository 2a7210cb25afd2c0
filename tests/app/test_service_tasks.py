"""Task assignment service: invariants and validation, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.models import (
    Annotation,
    AnnotationStatus,
    Lease,
    LeaseStatus,
    Project,
    ProjectMember,
    Prompt,
    Role,
    utcnow,
)
from app.schemas import SubmitAnnotation
from app.services import tasks
from tests.factories import count, make_annotation, make_project, make_prompt, make_user


def ranking(task, *, tie_first_two: bool = False) -> list[list[int]]:
    ids = [c.id for c in task.completions]
    if tie_first_two:
        return [ids[:2], *[[i] for i in ids[2:]]]
    return [[i] for i in ids]


def submit(session, task, user, **fields):
    data = SubmitAnnotation(**{"ranking": ranking(task), **fields})
    return tasks.submit(session, lease_id=task.lease_id, user=user, data=data)


def expire(session, lease_id: int) -> None:
    session.execute(
        update(Lease).where(Lease.id == lease_id).values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


def lease_of(session, task) -> Lease:
    session.expire_all()
    return session.get(Lease, task.lease_id)


# --------------------------------------------------------------------------- next


def test_next_gives_k_completions_in_a_stored_random_order(session):
    project = make_project(session, completions_per_task=4)
    prompt = make_prompt(session, project, k=5)
    user = make_user(session)

    task = tasks.next_task(session, slug=project.slug, user=user)

    assert task is not None
    assert task.prompt.id == prompt.id
    assert task.prompt.messages[0].content == prompt.messages[0]["content"]
    assert [c.label for c in task.completions] == ["A", "B", "C", "D"]
    first_four = sorted(c.id for c in prompt.completions)[:4]
    assert sorted(c.id for c in task.completions) == first_four
    assert lease_of(session, task).display_order == [c.id for c in task.completions]
    texts = {c.id: c.text for c in prompt.completions}
    assert all(c.text == texts[c.id] for c in task.completions)


def test_display_order_is_random_per_lease(session):
    project = make_project(session, overlap=1)
    for _ in range(12):
        make_prompt(session, project, k=4)
    user = make_user(session)
    orders = set()
    for _ in range(12):
        task = tasks.next_task(session, slug=project.slug, user=user)
        ids = [c.id for c in task.completions]
        orders.add(tuple(sorted(ids).index(i) for i in ids))
        submit(session, task, user)
    assert len(orders) > 1  # 12 identical orders by chance: probability 24**-11


def test_nothing_left_gives_none(session):
    project = make_project(session)
    assert tasks.next_task(session, slug=project.slug, user=make_user(session)) is None


def test_reload_resumes_the_open_lease_and_exclude_prefetches_another(session):
    project = make_project(session)
    make_prompt(session, project)
    make_prompt(session, project)
    user = make_user(session)

    first = tasks.next_task(session, slug=project.slug, user=user)
    again = tasks.next_task(session, slug=project.slug, user=user)
    prefetched = tasks.next_task(session, slug=project.slug, user=user, exclude=[first.lease_id])

    assert again.lease_id == first.lease_id
    assert again.completions == first.completions
    assert prefetched.lease_id != first.lease_id
    assert prefetched.prompt.id != first.prompt.id


def test_prompts_need_two_completions(session):
    project = make_project(session)
    make_prompt(session, project, k=1)
    make_prompt(session, project, k=0)
    assert tasks.next_task(session, slug=project.slug, user=make_user(session)) is None


def test_prompts_with_annotations_are_served_first(session):
    project = make_project(session, overlap=3)
    prompts = [make_prompt(session, project) for _ in range(4)]
    make_annotation(session, prompts[1], make_user(session))
    make_annotation(session, prompts[2], make_user(session))
    make_annotation(session, prompts[2], make_user(session))

    user = make_user(session)
    served = []
    for _ in range(4):
        task = tasks.next_task(session, slug=project.slug, user=user)
        served.append(task.prompt.id)
        submit(session, task, user)
    assert served[:2] == [prompts[2].id, prompts[1].id]
    assert sorted(served[2:]) == sorted([prompts[0].id, prompts[3].id])


# --------------------------------------------------------------------------- overlap


def test_overlap_counts_live_leases_and_submissions(session):
    project = make_project(session, overlap=2)
    prompt = make_prompt(session, project)
    u1, u2, u3 = (make_user(session) for _ in range(3))

    t1 = tasks.next_task(session, slug=project.slug, user=u1)
    t2 = tasks.next_task(session, slug=project.slug, user=u2)
    assert t1.prompt.id == t2.prompt.id == prompt.id
    assert tasks.next_task(session, slug=project.slug, user=u3) is None  # 2 live leases

    submit(session, t1, u1)
    assert tasks.next_task(session, slug=project.slug, user=u3) is None  # 1 submitted + 1 live

    expire(session, t2.lease_id)  # reclaimed by the next request, no cron
    t3 = tasks.next_task(session, slug=project.slug, user=u3)
    assert t3 is not None
    assert t3.prompt.id == prompt.id
    assert lease_of(session, t2).status == LeaseStatus.expired
    submit(session, t3, u3)
    assert tasks.next_task(session, slug=project.slug, user=make_user(session)) is None
    assert tasks.check_invariants(session, project_id=project.id) == []
    session.refresh(prompt)
    assert (prompt.annotation_count, prompt.open_leases) == (2, 0)


def test_an_annotator_never_gets_a_prompt_twice(session):
    project = make_project(session, overlap=5)
    make_prompt(session, project)
    skipper, submitter, sleeper = (make_user(session) for _ in range(3))

    t = tasks.next_task(session, slug=project.slug, user=skipper)
    tasks.skip(session, lease_id=t.lease_id, user=skipper, reason="not my language")
    assert tasks.next_task(session, slug=project.slug, user=skipper) is None

    t = tasks.next_task(session, slug=project.slug, user=submitter)
    submit(session, t, submitter)
    assert tasks.next_task(session, slug=project.slug, user=submitter) is None

    t = tasks.next_task(session, slug=project.slug, user=sleeper)
    expire(session, t.lease_id)
    assert tasks.next_task(session, slug=project.slug, user=sleeper) is None


def test_skip_records_the_reason_and_frees_the_slot(session):
    project = make_project(session, overlap=1)
    prompt = make_prompt(session, project)
    u1, u2 = make_user(session), make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=u1)

    recorded = tasks.skip(session, lease_id=task.lease_id, user=u1, reason=" unclear ")

    annotation = session.get(Annotation, recorded.annotation_id)
    assert annotation.status == AnnotationStatus.skipped
    assert annotation.skip_reason == "unclear"
    assert annotation.display_order == [c.id for c in task.completions]
    assert tasks.next_task(session, slug=project.slug, user=u2).prompt.id == prompt.id
    again = tasks.skip(session, lease_id=task.lease_id, user=u1, reason="unclear")
    assert again.replayed
    assert again.annotation_id == recorded.annotation_id


def test_lowered_overlap_never_lets_a_prompt_exceed_it(session):
    project = make_project(session, overlap=2)
    prompt = make_prompt(session, project)
    u1, u2 = make_user(session), make_user(session)
    t1 = tasks.next_task(session, slug=project.slug, user=u1)
    t2 = tasks.next_task(session, slug=project.slug, user=u2)
    submit(session, t1, u1)
    session.execute(update(Project).where(Project.id == project.id).values(overlap=1))
    session.commit()
    session.expire_all()

    with pytest.raises(Conflict, match="already has all the annotations"):
        submit(session, t2, u2)
    assert session.scalar(select(Prompt.annotation_count).where(Prompt.id == prompt.id)) == 1
    assert tasks.check_invariants(session, project_id=project.id) == []


# --------------------------------------------------------------------------- submit


def test_submit_stores_what_was_shown(session):
    project = make_project(session, flags=["hallucination", "harmful advice"])
    make_prompt(session, project)
    user = make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=user)
    ids = [c.id for c in task.completions]

    recorded = submit(
        session,
        task,
        user,
        ranking=[[ids[2]], [ids[0], ids[3]], [ids[1]]],
        likert={str(ids[0]): 6, str(ids[1]): 1},
        flags={str(ids[1]): ["hallucination"], str(ids[2]): []},
        rationale="  C is right  ",
        duration_ms=4200,
    )

    a = session.get(Annotation, recorded.annotation_id)
    assert a.status == AnnotationStatus.submitted
    assert a.lease_id == task.lease_id
    assert a.ranking == [[ids[2]], [ids[0], ids[3]], [ids[1]]]
    assert a.likert == {str(ids[0]): 6, str(ids[1]): 1}
    assert a.flags == {str(ids[1]): ["hallucination"]}
    assert (a.rationale, a.duration_ms, a.revision) == ("C is right", 4200, 1)
    assert a.display_order == ids
    assert lease_of(session, task).status == LeaseStatus.submitted


def test_retried_submit_returns_the_same_annotation(session):
    project = make_project(session)
    make_prompt(session, project)
    user = make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=user)

    first = submit(session, task, user, duration_ms=10)
    retry = submit(session, task, user, duration_ms=10)
    assert retry.replayed
    assert retry.annotation_id == first.annotation_id
    assert count(session, Annotation) == 1
    with pytest.raises(Conflict, match="different content"):
        submit(session, task, user, ranking=list(reversed(ranking(task))))
    assert count(session, Annotation) == 1


@pytest.mark.parametrize(
    ("project_fields", "build", "field", "message"),
    [
        (
            {},
            lambda ids: {"ranking": [[i] for i in ids[:3]]},
            "ranking",
            "every completion must be ranked; missing: {3}",
        ),
        (
            {},
            lambda ids: {"ranking": [[i] for i in ids] + [[ids[0]]]},
            "ranking.4",
            "completion {0} is ranked more than once",
        ),
        (
            {},
            lambda ids: {"ranking": [[i] for i in ids] + [[999_999_999]]},
            "ranking.4",
            "completion 999999999 is not part of this task",
        ),
        ({}, lambda ids: {"ranking": [[i] for i in ids] + [[]]}, "ranking.4", "empty group"),
        (
            {"allow_ties": False},
            lambda ids: {"ranking": [ids[:2], [ids[2]], [ids[3]]]},
            "ranking",
            "ties are not allowed in this project",
        ),
        (
            {"likert": False},
            lambda ids: {"ranking": [[i] for i in ids], "likert": {str(ids[0]): 4}},
            "likert",
            "this project does not collect Likert scores",
        ),
        (
            {},
            lambda ids: {"ranking": [[i] for i in ids], "likert": {"12345678": 4}},
            "likert.12345678",
            "not a completion of this task",
        ),
        (
            {"flags": ["hallucination"]},
            lambda ids: {"ranking": [[i] for i in ids], "flags": {str(ids[0]): ["rude"]}},
            "flags.{0}",
            "not one of the project's flags: 'rude'",
        ),
        (
            {"require_rationale": True},
            lambda ids: {"ranking": [[i] for i in ids], "rationale": "   "},
            "rationale",
            "this project requires a rationale",
        ),
        (
            {},
            lambda ids: {"ranking": [[i] for i in ids], "strength": 2},
            "strength",
            "only for pairwise tasks (2 completions)",
        ),
        (
            {"completions_per_task": 2},
            lambda ids: {"ranking": [[ids[0]], [ids[1]]], "both_bad": True},
            "both_bad",
            "'both bad' is recorded as a tie: rank both in one group",
        ),
        (
            {"completions_per_task": 2},
            lambda ids: {"ranking": [ids], "strength": 1},
            "strength",
            "a tie has no strength",
        ),
    ],
)
def test_invalid_submissions_write_nothing(session, project_fields, build, field, message):
    # Fields and messages name ids by their position in the task ("{0}" = label A).
    project = make_project(session, **project_fields)
    make_prompt(session, project, k=project_fields.get("completions_per_task", 4))
    user = make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=user)
    ids = [c.id for c in task.completions]
    want_field, want_message = field.format(*ids), message.format(*ids)
    before = count(session, Annotation)
    with pytest.raises(InvalidInput) as caught:
        tasks.submit(
            session, lease_id=task.lease_id, user=user, data=SubmitAnnotation(**build(ids))
        )
    assert {"field": want_field, "message": want_message} in caught.value.errors
    assert count(session, Annotation) == before
    assert lease_of(session, task).status == LeaseStatus.open  # still usable after a fix


def test_pairwise_strength_and_both_bad_are_stored(session):
    project = make_project(session, completions_per_task=2, allow_ties=False)
    make_prompt(session, project, k=2)
    make_prompt(session, project, k=2)
    user = make_user(session)

    t1 = tasks.next_task(session, slug=project.slug, user=user)
    a1 = submit(session, t1, user, strength=2)
    t2 = tasks.next_task(session, slug=project.slug, user=user)
    ids = [c.id for c in t2.completions]
    a2 = submit(session, t2, user, ranking=[ids], both_bad=True)  # allowed without ties

    assert session.get(Annotation, a1.annotation_id).strength == 2
    stored = session.get(Annotation, a2.annotation_id)
    assert stored.both_bad
    assert stored.ranking == [ids]


def test_someone_elses_lease_is_forbidden(session):
    project = make_project(session)
    make_prompt(session, project)
    owner, other = make_user(session), make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=owner)
    with pytest.raises(Forbidden):
        submit(session, task, other)
    with pytest.raises(Forbidden):
        tasks.skip(session, lease_id=task.lease_id, user=other, reason="")
    with pytest.raises(Forbidden):
        tasks.extend(session, lease_id=task.lease_id, user=other)
    assert count(session, Annotation) == 0


def test_expired_or_used_leases_conflict(session):
    project = make_project(session)
    make_prompt(session, project)
    make_prompt(session, project)
    user = make_user(session)
    t1 = tasks.next_task(session, slug=project.slug, user=user)
    expire(session, t1.lease_id)
    with pytest.raises(Conflict, match="expired"):
        submit(session, t1, user)
    with pytest.raises(Conflict):
        tasks.extend(session, lease_id=t1.lease_id, user=user)

    t2 = tasks.next_task(session, slug=project.slug, user=user)
    tasks.skip(session, lease_id=t2.lease_id, user=user, reason="")
    with pytest.raises(Conflict, match="already skipped"):
        submit(session, t2, user)
    with pytest.raises(NotFound):
        tasks.extend(session, lease_id=10**12, user=user)
    assert count(session, Annotation) == 1
    assert tasks.check_invariants(session, project_id=project.id) == []


def test_extend_pushes_the_expiry(session):
    project = make_project(session, lease_seconds=60)
    make_prompt(session, project)
    user = make_user(session)
    task = tasks.next_task(session, slug=project.slug, user=user)
    session.execute(
        update(Lease)
        .where(Lease.id == task.lease_id)
        .values(expires_at=utcnow() + timedelta(seconds=5))
    )
    session.commit()
    lease = tasks.extend(session, lease_id=task.lease_id, user=user)
    assert lease.expires_at > utcnow() + timedelta(seconds=55)


# --------------------------------------------------------------------------- members, progress


def test_members_only_projects(session):
    project = make_project(session, members_only=True)
    make_prompt(session, project)
    member, outsider = make_user(session), make_user(session)
    admin = make_user(session, role=Role.admin)
    session.add(ProjectMember(project_id=project.id, user_id=member.id))
    session.commit()

    with pytest.raises(Forbidden):
        tasks.next_task(session, slug=project.slug, user=outsider)
    with pytest.raises(Forbidden):
        tasks.labeling_context(session, slug=project.slug, user=outsider)
    assert tasks.next_task(session, slug=project.slug, user=member) is not None
    assert tasks.next_task(session, slug=project.slug, user=admin) is not None
    assert project.slug not in [p.slug for p in tasks.annotator_home(session, user=outsider)]
    assert project.slug in [p.slug for p in tasks.annotator_home(session, user=member)]


def test_unknown_project(session):
    with pytest.raises(NotFound):
        tasks.next_task(session, slug="nope", user=make_user(session))


def test_progress_for_the_home_page_and_the_labeling_page(session):
    project = make_project(session, overlap=1, guidelines="# Be kind")
    prompts = [make_prompt(session, project) for _ in range(3)]
    user = make_user(session)
    make_annotation(session, prompts[0], make_user(session))
    task = tasks.next_task(session, slug=project.slug, user=user)
    submit(session, task, user)

    [home] = [p for p in tasks.annotator_home(session, user=user) if p.slug == project.slug]
    assert (home.prompt_count, home.complete_count, home.my_count) == (3, 2, 1)
    assert home.available
    context = tasks.labeling_context(session, slug=project.slug, user=user)
    assert (context.my_count, context.complete_count, context.guidelines) == (1, 2, "# Be kind")
    assert context.pending_generation == 0


def test_random_workload_keeps_every_invariant(session):
    rng = random.Random(7)
    project = make_project(session, overlap=2, completions_per_task=3)
    for _ in range(6):
        make_prompt(session, project, k=3)
    users = [make_user(session) for _ in range(5)]
    held: dict[int, list] = {u.id: [] for u in users}
    for _ in range(80):
        user = rng.choice(users)
        action = rng.random()
        if action < 0.45 or not held[user.id]:
            task = tasks.next_task(
                session, slug=project.slug, user=user, exclude=[t.lease_id for t in held[user.id]]
            )
            if task is not None and task.lease_id not in {t.lease_id for t in held[user.id]}:
                held[user.id].append(task)
        else:
            task = held[user.id].pop(rng.randrange(len(held[user.id])))
            try:
                if action < 0.75:
                    submit(session, task, user)
                elif action < 0.85:
                    tasks.skip(session, lease_id=task.lease_id, user=user, reason="")
                else:
                    expire(session, task.lease_id)
            except Conflict:
                pass
        assert tasks.check_invariants(session, project_id=project.id) == []
    submitted = session.scalar(
        select(func.count()).where(
            Annotation.project_id == project.id, Annotation.status == AnnotationStatus.submitted
        )
    )
    assert 0 < submitted <= 12
