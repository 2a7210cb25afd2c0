"""app.services.stats on SQLite and PostgreSQL: only current annotations count (the latest
revision; skips only for the skip rate), progress and per-day counts, agreement, an outlier
annotator flagged, biases, the model leaderboard, pseudonyms, odd stored JSON read the slow
way, and the CSV tables."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from app.errors import NotFound
from app.models import AnnotationStatus, Completion, Prompt
from app.ranking import pseudonym
from app.services import stats
from tests.factories import make_annotation, make_project, make_prompt, make_user

SECRET = "stats-secret"


def strict(prompt, order):
    """A ranking of the prompt's completions in the given index order, best first."""
    ids = [c.id for c in prompt.completions]
    return [[ids[i]] for i in order]


def test_unknown_project_is_not_found(session):
    with pytest.raises(NotFound):
        stats.project_stats(session, slug="nope", secret=SECRET)


def test_an_empty_project_has_no_statistics(session):
    project = make_project(session)
    make_prompt(session, project)
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert s.progress.prompts == 1
    assert s.progress.untouched == 1
    assert s.progress.submitted == 0
    assert s.progress.skip_rate is None
    assert s.agreement.pairwise.rate is None
    assert s.agreement.ranking_alpha is None
    assert s.annotators == []
    assert s.models == []
    assert s.progress.days == []


def test_perfect_agreement_progress_and_days(session):
    project = make_project(session, overlap=2, completions_per_task=4)
    users = [make_user(session) for _ in range(2)]
    prompts = [make_prompt(session, project) for _ in range(3)]
    day = datetime(2026, 11, 20, 23, 59, 59, 900_000, tzinfo=UTC)  # floored, not rounded
    for prompt in prompts[:2]:
        for u in users:
            make_annotation(
                session,
                prompt,
                u,
                ranking=strict(prompt, [0, 1, 2, 3]),
                duration_ms=4000,
                created_at=day,
            )
    make_annotation(
        session,
        prompts[2],
        users[0],
        ranking=strict(prompts[2], [0, 1, 2, 3]),
        duration_ms=8000,
        created_at=day + timedelta(days=2),
    )
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    p = s.progress
    assert (p.prompts, p.complete, p.in_progress, p.untouched) == (3, 2, 1, 0)
    assert p.submitted == 5
    assert p.skipped == 0
    assert p.median_duration_ms == 4000
    assert [(d.day.isoformat(), d.submitted) for d in p.days] == [
        ("2026-11-20", 4),
        ("2026-11-21", 0),
        ("2026-11-22", 1),
    ]
    pw = s.agreement.pairwise
    assert (pw.agree, pw.compared, pw.rate, pw.prompts) == (12, 12, 1.0, 2)
    assert pw.ci_low == 1.0
    assert pw.ci_high == 1.0
    assert s.agreement.ranking_alpha == pytest.approx(1.0)
    a = {x.username: x for x in s.annotators}
    assert a[users[0].username].submitted == 3
    assert a[users[0].username].consensus == 1.0
    assert a[users[0].username].pseudonym == pseudonym(users[0].id, secret=SECRET)
    assert not any(x.outlier for x in s.annotators)


def test_only_the_latest_revision_counts_and_skips_count_for_the_skip_rate(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    u1, u2, u3 = (make_user(session) for _ in range(3))
    prompt = make_prompt(session, project, k=2)
    first = make_annotation(session, prompt, u1, ranking=strict(prompt, [1, 0]))
    make_annotation(
        session, prompt, u1, ranking=strict(prompt, [0, 1]), revision=2, supersedes_id=first.id
    )
    make_annotation(session, prompt, u2, ranking=strict(prompt, [0, 1]))
    make_annotation(
        session,
        prompt,
        u3,
        status=AnnotationStatus.skipped,
        ranking=[],
        skip_reason="  Too LONG ",
    )
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert (s.progress.submitted, s.progress.skipped) == (2, 1)
    assert s.progress.skip_rate == pytest.approx(1 / 3)
    assert [(r.reason, r.count) for r in s.progress.skip_reasons] == [("too long", 1)]
    assert s.agreement.pairwise.rate == 1.0  # the superseded revision disagreed
    by_user = {a.user_id: a for a in s.annotators}
    assert by_user[u3.id].skipped == 1
    assert by_user[u3.id].submitted == 0


def test_an_annotator_far_from_the_rest_is_flagged(session):
    project = make_project(session, overlap=4, completions_per_task=4)
    good = [make_user(session) for _ in range(3)]
    odd = make_user(session)
    for i in range(12):
        prompt = make_prompt(session, project)
        ids = [c.id for c in prompt.completions]
        rotated = ids[i % 4 :] + ids[: i % 4]  # the best is shown first one time in four
        for u in good:
            make_annotation(
                session, prompt, u, ranking=strict(prompt, [0, 1, 2, 3]), display_order=rotated
            )
        # Always puts the first-shown completion first, and otherwise reverses the others.
        make_annotation(
            session,
            prompt,
            odd,
            ranking=strict(prompt, [3, 2, 1, 0]),
            display_order=list(reversed(ids)),
        )
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    by_user = {a.user_id: a for a in s.annotators}
    flagged = by_user[odd.id]
    assert flagged.outlier
    assert flagged.outlier_reasons == ["low_agreement", "position_bias"]
    assert flagged.consensus == 0.0
    assert flagged.position_rate == 1.0
    assert flagged.position_expected == 0.25
    assert all(not by_user[u.id].outlier for u in good)
    assert s.outlier_rule.median == 1.0
    assert s.outlier_rule.threshold == pytest.approx(0.9)


def test_the_model_leaderboard_and_length_bias(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    users = [make_user(session) for _ in range(2)]
    for i in range(10):
        prompt = make_prompt(session, project, k=2)  # completion 0 is model m0, 1 is m1
        winner = 0 if i < 8 else 1
        for u in users:
            make_annotation(session, prompt, u, ranking=strict(prompt, [winner, 1 - winner]))
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert [m.model for m in s.models] == ["m0", "m1"]
    top = s.models[0]
    assert (top.wins, top.comparisons) == (16, 20)
    assert top.strength > 0 > s.models[1].strength
    assert top.ci_low is not None
    assert top.ci_low <= top.strength <= top.ci_high
    pair = s.model_pairs[0]
    assert (pair.model, pair.opponent, pair.wins, pair.losses) == ("m0", "m1", 16, 4)
    assert s.bias.length_pairs == 0  # the factory's texts have the same length


def test_flags_and_likert(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    u1, u2 = make_user(session), make_user(session)
    prompt = make_prompt(session, project, k=2)
    a, b = (str(c.id) for c in prompt.completions)
    make_annotation(
        session,
        prompt,
        u1,
        likert={a: 7, b: 2},
        flags={b: ["hallucination", "harmful advice"]},
    )
    make_annotation(session, prompt, u2, likert={a: 6, b: 2})
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert {(f.flag, f.count) for f in s.flags} == {("hallucination", 1), ("harmful advice", 1)}
    by_user = {x.user_id: x for x in s.annotators}
    assert by_user[u1.id].flagged == 1
    assert by_user[u1.id].flag_rate == 1.0
    assert by_user[u2.id].flag_rate == 0.0
    assert s.agreement.likert_pairs == 2
    assert s.agreement.likert_exact == 0.5
    assert s.agreement.likert_within_one == 1.0


def test_json_written_outside_the_labeling_service_is_read_the_slow_way(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    u1, u2 = make_user(session), make_user(session)
    prompt = make_prompt(session, project, k=2)
    a, b = (c.id for c in prompt.completions)
    make_annotation(session, prompt, u1, ranking=[[a], [b]], likert={str(a): 5, "note": "x;y"})
    make_annotation(session, prompt, u2, ranking=[[a], ["1;2"], [b]], likert={str(a): 5})
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert s.agreement.pairwise.rate == 1.0
    assert s.agreement.likert_exact == 1.0


def test_csv_tables(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    users = [make_user(session, username=f"=cmd{i}") for i in range(2)]
    prompt = make_prompt(session, project, k=2)
    for u in users:
        make_annotation(session, prompt, u, ranking=strict(prompt, [0, 1]))
    name, text = stats.stats_csv(session, slug=project.slug, secret=SECRET, table="annotators")
    assert name == f"{project.slug}-annotators.csv"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    assert {r["username"] for r in rows} == {"'=cmd0", "'=cmd1"}  # no formula injection
    assert rows[0]["consensus"] == "1"  # the other annotator alone is the majority
    for table in ("models", "pairs", "days", "summary"):
        _, text = stats.stats_csv(session, slug=project.slug, secret=SECRET, table=table)
        assert text.count("\n") >= 2, table
    _, summary = stats.stats_csv(session, slug=project.slug, secret=SECRET, table="summary")
    assert "pairwise_agreement,1\n" in summary


def test_open_leases_make_a_prompt_in_progress(session):
    project = make_project(session, overlap=2)
    prompt = make_prompt(session, project)
    session.execute(update(Prompt).where(Prompt.id == prompt.id).values(open_leases=1))
    session.commit()
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert (s.progress.in_progress, s.progress.untouched) == (1, 0)


def test_bigint_completion_ids_are_read_exactly(session):
    project = make_project(session, overlap=2, completions_per_task=2)
    prompt = Prompt(project_id=project.id, external_id="big", messages=[], metadata_={})
    prompt.completions = [
        Completion(id=5_000_000_000 + i, external_id=f"c{i}", text="x" * (i + 1), model=f"m{i}")
        for i in range(2)
    ]
    session.add(prompt)
    session.commit()
    big, bigger = (c.id for c in prompt.completions)
    users = [make_user(session) for _ in range(2)]
    for u in users:
        make_annotation(session, prompt, u, ranking=[[bigger], [big]], display_order=[bigger, big])
    s = stats.project_stats(session, slug=project.slug, secret=SECRET)
    assert s.bias.position_rate == 1.0  # the first shown (bigger) won both times
    assert s.bias.length_rate == 1.0  # and it is the longer one
    assert [m.model for m in s.models] == ["m1", "m0"]


def test_parallel_reads_on_postgresql_equal_the_serial_ones(tmp_path):
    """A session bound to the engine reads the completions and the sparse columns on a second
    connection, in the same exported snapshot; the statistics equal those of the serial path
    (a session bound to one connection, as in the other tests)."""
    from sqlalchemy.orm import Session

    from app.db import make_engine
    from tests.conftest import create_database, migrate

    url, drop = create_database("postgresql", tmp_path)
    engine = None
    try:
        migrate(url)
        engine = make_engine(url, pool_size=2)
        with Session(engine, expire_on_commit=False) as s:
            project = make_project(s, overlap=3, completions_per_task=4)
            users = [make_user(s) for _ in range(3)]
            for i in range(4):
                prompt = make_prompt(s, project)
                for j, u in enumerate(users):
                    if i == 3 and j == 2:
                        make_annotation(
                            s, prompt, u, status=AnnotationStatus.skipped, skip_reason="Too long"
                        )
                        continue
                    ids = [c.id for c in prompt.completions]
                    make_annotation(
                        s,
                        prompt,
                        u,
                        ranking=strict(prompt, [(j + k) % 4 for k in range(4)]),
                        flags={str(ids[0]): ["hallucination"]} if (i + j) % 3 == 0 else {},
                        likert={str(c): 1 + (c + j) % 7 for c in ids},
                    )
            slug = project.slug
        with Session(engine) as s:  # bound to the engine: the parallel path
            assert stats._begin_parallel(s) is not None
            s.rollback()
            parallel = stats.project_stats(s, slug=slug, secret=SECRET)
        with engine.connect() as conn, Session(bind=conn) as s:  # one connection: serial
            assert stats._begin_parallel(s) is None
            serial = stats.project_stats(s, slug=slug, secret=SECRET)
        assert parallel.model_dump(exclude={"generated_at"}) == serial.model_dump(
            exclude={"generated_at"}
        )
        assert parallel.progress.skipped == 1
        assert [(r.reason, r.count) for r in parallel.progress.skip_reasons] == [("too long", 1)]
        assert [f.flag for f in parallel.flags] == ["hallucination"]
        assert sum(m.comparisons for m in parallel.models) > 0
    finally:
        if engine is not None:
            engine.dispose()
        drop()
