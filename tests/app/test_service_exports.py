"""app.services.exports: every format on both databases, the filters, the snapshot, Parquet."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime, timedelta
from itertools import combinations
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory
from app.errors import InvalidInput, NotFound
from app.exporting import JSON_OPTIONS
from app.models import Annotation, AnnotationStatus, Completion, Prompt
from app.ranking import split_of
from app.schemas import ExportParams
from app.services import exports
from app.services.exports import open_export
from app.services.imports import import_prompts
from tests.conftest import create_database, migrate
from tests.factories import make_annotation, make_project, make_prompt, make_user

SECRET = "test-export-secret"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def export_bytes(session: Session, slug: str, **params: Any) -> bytes:
    export = open_export(session, project_slug=slug, params=ExportParams(**params), secret=SECRET)
    out = io.BytesIO()
    export.write(out)
    return out.getvalue()


def rows(session: Session, slug: str, **params: Any) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in export_bytes(session, slug, **params).splitlines()]


def ids(prompt: Prompt) -> list[int]:
    return [c.id for c in prompt.completions]


def chat_prompt(session: Session, project, ext: str, messages: list[dict], k: int = 4) -> Prompt:
    prompt = Prompt(project_id=project.id, external_id=ext, messages=messages, metadata_={})
    prompt.completions = [
        Completion(external_id=f"{ext}-{i}", text=f"{ext} answer {i}") for i in range(k)
    ]
    session.add(prompt)
    session.commit()
    return prompt


@pytest.fixture
def k4(session):
    """A K = 4 project: 3 prompts, 2 annotators each, strict rankings with Likert scores."""
    project = make_project(session)
    users = [make_user(session) for _ in range(2)]
    prompts = [make_prompt(session, project, k=4) for _ in range(3)]
    for n, p in enumerate(prompts):
        c = ids(p)
        for u in users:
            make_annotation(
                session,
                p,
                u,
                ranking=[[c[0]], [c[1]], [c[2]], [c[3]]],
                likert={str(c[0]): 7, str(c[1]): 5, str(c[2]): 5, str(c[3]): 1},
                display_order=[c[3], c[2], c[1], c[0]],
                created_at=T0 + timedelta(minutes=n),
            )
    return project, prompts, users


# --------------------------------------------------------------------------- formats


def test_pairs_are_every_comparison_best_over_worse(session, k4):
    project, prompts, _ = k4
    got = rows(session, project.slug)
    assert len(got) == 3 * 2 * 6
    first = got[:6]
    p = prompts[0]
    ext = [c.external_id for c in p.completions]
    assert [(r["chosen_id"], r["rejected_id"]) for r in first] == [
        (ext[i], ext[j]) for i, j in combinations(range(4), 2)
    ]
    assert [r["margin"] for r in first] == [2.0, 2.0, 6.0, 0.0, 4.0, 4.0]
    assert all(r["tie"] is False for r in got)
    assert first[0]["prompt"] == p.messages[0]["content"]
    assert first[0]["chosen"] == p.completions[0].text
    assert (first[0]["position_chosen"], first[0]["position_rejected"]) == (3, 2)
    assert (first[0]["likert_chosen"], first[0]["likert_rejected"]) == (7, 5)
    assert len({r["group_id"] for r in got}) == 6
    assert all(r["group_id"] == f"a{r['annotation_id']}" for r in got)
    assert got[0]["created_at"] == "2026-06-01T12:00:00Z"


def test_ties_keep_adds_margin_zero_pairs(session):
    project = make_project(session)
    p = make_prompt(session, project, k=4)
    c = ids(p)
    make_annotation(session, p, make_user(session), ranking=[[c[0], c[1], c[2]], [c[3]]])
    dropped = rows(session, project.slug)
    kept = rows(session, project.slug, ties="keep")
    assert len(dropped) == 3
    assert len(kept) == 3 + 3  # + C(3, 2) tied pairs
    ties = [r for r in kept if r["tie"]]
    assert len(ties) == 3
    assert all(r["margin"] == 0.0 for r in ties)


def test_strength_is_the_margin_of_a_pairwise_task(session):
    project = make_project(session, completions_per_task=2)
    p = make_prompt(session, project, k=2)
    a, b = ids(p)
    make_annotation(session, p, make_user(session), ranking=[[b], [a]], strength=2)
    make_annotation(session, p, make_user(session), ranking=[[a, b]], both_bad=True)
    got = rows(session, project.slug, ties="keep")
    assert [(r["chosen_id"], r["margin"], r["tie"]) for r in got] == [
        (p.completions[1].external_id, 2.0, False),
        (p.completions[0].external_id, 0.0, True),
    ]


def test_rankings_rows(session, k4):
    project, prompts, _ = k4
    got = rows(session, project.slug, format="rankings")
    assert len(got) == 6
    r, p = got[0], prompts[0]
    ext = [c.external_id for c in p.completions]
    assert r["completions"] == [
        {"id": c.external_id, "text": c.text, "model": c.model} for c in p.completions
    ]
    assert r["ranking"] == [[e] for e in ext]
    assert r["likert"] == {ext[0]: 7, ext[1]: 5, ext[2]: 5, ext[3]: 1}
    assert r["display_order"] == ext[::-1]
    assert r["flags"] == {}
    assert r["rationale"] == ""
    assert r["strength"] is None


def test_consensus_rows(session, k4):
    project, prompts, _ = k4
    p = prompts[0]
    c = ids(p)
    make_annotation(session, p, make_user(session), ranking=[[c[1]], [c[0]], [c[2]], [c[3]]])
    got = rows(session, project.slug, format="consensus")
    assert [r["prompt_id"] for r in got] == [q.external_id for q in prompts]
    first = got[0]
    ext = [x.external_id for x in p.completions]
    assert first["annotators"] == 3
    assert first["ranking"] == [[e] for e in ext]  # 2 of 3 put a above b
    assert first["compared_pairs"] == 3 * 6
    assert first["agreement"] == pytest.approx((6 + 5 + 5) / 18)
    assert math.isclose(sum(first["scores"].values()), 0.0, abs_tol=1e-5)
    assert got[1]["agreement"] == 1.0


def test_hh_records(session, k4):
    project, prompts, _ = k4
    got = rows(session, project.slug, format="hh")
    assert len(got) == 36
    p = prompts[0]
    q = p.messages[0]["content"]
    assert got[0] == {
        "chosen": f"\n\nHuman: {q}\n\nAssistant: {p.completions[0].text}",
        "rejected": f"\n\nHuman: {q}\n\nAssistant: {p.completions[1].text}",
    }


def test_hh_export_imports_back_as_the_same_prompts(session):
    """K = 4 gives 6 HH records per annotation (and 12 for two annotators): importing them
    gives one prompt per conversation with all its completions."""
    project = make_project(session)
    single = make_prompt(session, project, k=4, text="Naïve café question ☕?")
    chat = chat_prompt(
        session,
        project,
        "conv",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Name a prime."},
        ],
    )
    for p in (single, chat):
        c = ids(p)
        for u in (make_user(session), make_user(session)):
            make_annotation(session, p, u, ranking=[[c[2]], [c[0]], [c[3]], [c[1]]])
    data = export_bytes(session, project.slug, format="hh")
    assert len(data.splitlines()) == 2 * 2 * 6
    target = make_project(session)
    result = import_prompts(
        session, project_slug=target.slug, source=io.BytesIO(data), max_bytes=1 << 20
    )
    assert (result.created, result.completions_created) == (2, 8)
    imported = session.scalars(
        select(Prompt).where(Prompt.project_id == target.id).order_by(Prompt.id)
    ).all()
    want = {orjson.dumps(p.messages): sorted(c.text for c in p.completions) for p in (single, chat)}
    got = {orjson.dumps(p.messages): sorted(c.text for c in p.completions) for p in imported}
    assert got == want


def test_hh_leaves_system_messages_out(session):
    project = make_project(session)
    p = chat_prompt(
        session,
        project,
        "sys",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        k=2,
    )
    a, b = ids(p)
    make_annotation(session, p, make_user(session), ranking=[[a], [b]])
    (rec,) = rows(session, project.slug, format="hh")
    assert rec["chosen"] == "\n\nHuman: 2+2?\n\nAssistant: sys answer 0"


# --------------------------------------------------------------------------- prompt shape


def test_a_chat_prompt_makes_the_whole_export_conversational(session, k4):
    project, prompts, _ = k4
    text_rows = rows(session, project.slug)
    assert all(isinstance(r["prompt"], str) for r in text_rows)
    forced = rows(session, project.slug, prompt_format="chat")
    assert forced[0]["prompt"] == prompts[0].messages
    assert forced[0]["chosen"] == [{"role": "assistant", "content": prompts[0].completions[0].text}]
    chat_prompt(
        session,
        project,
        "late",
        [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
    )
    auto = rows(session, project.slug)  # the new chat prompt has no annotation yet
    assert all(isinstance(r["prompt"], list) for r in auto)
    assert [r["prompt"] for r in auto] == [r["prompt"] for r in forced]


# --------------------------------------------------------------------------- filters


def test_superseded_and_skipped_annotations_are_never_exported(session):
    project = make_project(session)
    p = make_prompt(session, project, k=2)
    a, b = ids(p)
    alice, bob, carol = (make_user(session) for _ in range(3))
    first = make_annotation(session, p, alice, ranking=[[a], [b]])
    second = make_annotation(
        session, p, alice, ranking=[[b], [a]], revision=2, supersedes_id=first.id
    )
    make_annotation(session, p, bob, status=AnnotationStatus.skipped, ranking=[])
    # carol submitted, then her correction was a skip: nothing of hers is current.
    old = make_annotation(session, p, carol, ranking=[[a], [b]])
    make_annotation(
        session,
        p,
        carol,
        status=AnnotationStatus.skipped,
        ranking=[],
        revision=2,
        supersedes_id=old.id,
    )
    for fmt in ("pairs", "rankings", "hh"):
        got = rows(session, project.slug, format=fmt)
        assert len(got) == 1, fmt
    assert rows(session, project.slug)[0]["annotation_id"] == second.id
    assert rows(session, project.slug, format="consensus")[0]["annotation_ids"] == [second.id]


def make_many(session: Session, n: int, *, project=None):
    project = project or make_project(session)
    user = make_user(session)
    out = []
    for _ in range(n):
        p = make_prompt(session, project, k=2)
        make_annotation(session, p, user)
        out.append(p)
    return project, out


def sides(session: Session, slug: str, **params: Any) -> dict[str, set[str]]:
    return {
        s: {r["prompt_id"] for r in rows(session, slug, split=s, **params)}
        for s in ("train", "test")
    }


def test_split_is_by_prompt_stable_and_seeded(session):
    project, prompts = make_many(session, 60)
    every = {p.external_id for p in prompts}
    before = sides(session, project.slug, test_fraction=0.3, seed=7)
    assert before["train"] | before["test"] == every
    assert not before["train"] & before["test"]
    assert before["test"] == {e for e in every if split_of(e, seed=7, test_fraction=0.3) == "test"}
    assert 5 <= len(before["test"]) <= 35
    # More data arrives: every prompt keeps its side.
    make_many(session, 20, project=project)
    after = sides(session, project.slug, test_fraction=0.3, seed=7)
    assert before["test"] <= after["test"]
    assert before["train"] <= after["train"]
    assert sides(session, project.slug, test_fraction=0.3, seed=8) != after
    # A prompt's rows are all on its side, several annotators included.
    p = prompts[0]
    make_annotation(session, p, make_user(session))
    both = sides(session, project.slug, test_fraction=0.3, seed=7)
    assert (p.external_id in both["test"]) != (p.external_id in both["train"])


def test_min_agreement(session):
    project = make_project(session)
    agree, disagree, single = (make_prompt(session, project, k=3) for _ in range(3))
    u1, u2 = make_user(session), make_user(session)
    for p in (agree, disagree, single):
        c = ids(p)
        make_annotation(session, p, u1, ranking=[[c[0]], [c[1]], [c[2]]])
        if p is agree:
            make_annotation(session, p, u2, ranking=[[c[0]], [c[1]], [c[2]]])
        elif p is disagree:
            make_annotation(session, p, u2, ranking=[[c[2]], [c[1]], [c[0]]])

    def kept(**params: Any) -> list[str]:
        got = rows(session, project.slug, format="consensus", **params)
        return [r["prompt_id"] for r in got]

    names = [agree.external_id, disagree.external_id, single.external_id]
    assert kept() == names  # unset: every prompt, single annotators included
    assert kept(min_agreement=0) == names  # 0 is the same as unset
    assert kept(min_agreement=0.5) == [agree.external_id]
    assert kept(min_agreement=1.0) == [agree.external_id]
    assert len(rows(session, project.slug, min_agreement=1.0)) == 2 * 3


def test_since_keeps_newer_annotations_and_agreement_counts_every_annotator(session):
    project = make_project(session)
    p = make_prompt(session, project, k=2)
    a, b = ids(p)
    old = make_annotation(session, p, make_user(session), ranking=[[a], [b]], created_at=T0)
    new = make_annotation(
        session, p, make_user(session), ranking=[[a], [b]], created_at=T0 + timedelta(days=1)
    )
    q = make_prompt(session, project, k=2)
    make_annotation(session, q, make_user(session), created_at=T0)
    cut = (T0 + timedelta(hours=1)).isoformat()
    got = rows(session, project.slug, since=cut)
    assert [r["annotation_id"] for r in got] == [new.id]
    # Naive times are UTC.
    assert rows(session, project.slug, since="2026-06-01T13:00:00") == got
    # Agreement needs both annotators even though only one is new.
    assert [
        r["annotation_id"] for r in rows(session, project.slug, since=cut, min_agreement=1)
    ] == [new.id]
    cons = rows(session, project.slug, format="consensus", since=cut)
    assert [(r["prompt_id"], r["annotation_ids"]) for r in cons] == [
        (p.external_id, [old.id, new.id])
    ]


# --------------------------------------------------------------------------- errors


def test_unknown_project_and_bad_combinations(session):
    with pytest.raises(NotFound):
        open_export(session, project_slug="nope", params=ExportParams(), secret=SECRET)
    with pytest.raises(InvalidInput) as e:
        open_export(
            session,
            project_slug="nope",
            params=ExportParams(format="hh", ties="keep"),
            secret=SECRET,
        )
    assert e.value.errors == [
        {"field": "ties", "message": "ties=keep applies to format=pairs only"}
    ]


def test_empty_project_exports_nothing(session):
    project = make_project(session)
    assert export_bytes(session, project.slug) == b""
    data = export_bytes(session, project.slug, file="parquet")
    assert pq.read_table(io.BytesIO(data)).num_rows == 0


def _assert_fast_equals_slow(session: Session, slug: str) -> None:
    for params in ({}, {"ties": "keep"}, {"prompt_format": "chat"}):
        fast = export_bytes(session, slug, **params)
        export = open_export(
            session, project_slug=slug, params=ExportParams(**params), secret=SECRET
        )
        slow = b"".join(orjson.dumps(r, option=JSON_OPTIONS) for r in export.rows())
        assert fast
        assert fast == slow


def test_jsonl_fast_path_equals_the_rows_serialised_by_orjson(session, k4):
    """``pairs`` JSON Lines are assembled from pre-serialised pieces; they must be exactly
    what orjson writes for the rows (ties, missing Likert scores and positions, chat, Unicode)."""
    project, prompts, _ = k4
    p = prompts[2]
    c = ids(p)
    make_annotation(
        session,
        p,
        make_user(session),
        ranking=[[c[2], c[0]], [c[1]], [c[3]]],
        likert={str(c[0]): 3},
        display_order=[],
    )
    _assert_fast_equals_slow(session, project.slug)
    q = chat_prompt(
        session,
        project,
        "conv-ü",
        [
            {"role": "system", "content": "Sé breve."},
            {"role": "user", "content": '¿Qué? "quoted"\n\ttab \u2028 😀'},
        ],
    )
    make_annotation(
        session,
        q,
        make_user(session),
        ranking=[[i] for i in ids(q)[::-1]],
        likert={str(i): 7 - n for n, i in enumerate(ids(q))},
    )
    _assert_fast_equals_slow(session, project.slug)


# --------------------------------------------------------------------------- parquet


def _plain(value: Any) -> Any:
    """Parquet's values as JSON Lines writes them (maps → objects, times → RFC 3339)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
            f".{value.microsecond:06d}Z" if value.microsecond else "Z"
        )
    if isinstance(value, list) and value and all(isinstance(x, tuple) for x in value):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("fmt", ["pairs", "rankings", "consensus", "hh"])
@pytest.mark.parametrize("chat", [False, True])
def test_parquet_round_trip_equals_jsonl(session, k4, fmt, chat):
    project, prompts, _ = k4
    p = prompts[1]
    make_annotation(
        session,
        p,
        make_user(session),
        ranking=[[ids(p)[3]], ids(p)[:3]],
        flags={str(ids(p)[0]): ["hallucination"]},
    )
    params: dict[str, Any] = {"format": fmt, "prompt_format": "chat" if chat else "auto"}
    want = rows(session, project.slug, **params)
    table = pq.read_table(io.BytesIO(export_bytes(session, project.slug, file="parquet", **params)))
    got = [_plain(r) for r in table.to_pylist()]
    if fmt == "rankings":  # an empty map reads back as an empty list
        for r in got:
            r["likert"] = r["likert"] or {}
            r["flags"] = r["flags"] or {}
    assert got == want


def test_parquet_rows_come_in_row_groups(session, monkeypatch):
    monkeypatch.setattr(exports, "PARQUET_ROWS", 5)
    project, _ = make_many(session, 12)
    meta = pq.ParquetFile(io.BytesIO(export_bytes(session, project.slug, file="parquet"))).metadata
    assert (meta.num_rows, meta.num_row_groups) == (12, 3)


# --------------------------------------------------------------------------- streaming


def test_rows_stream_in_batches(session, monkeypatch):
    """With tiny batches and chunks, the first row comes before the last prompt is read."""
    project, _ = make_many(session, 10)
    monkeypatch.setattr(exports, "CHUNK_BYTES", 1)
    export = open_export(
        session, project_slug=project.slug, params=ExportParams(), secret=SECRET, batch_size=2
    )
    chunks = export.chunks()
    next(chunks)
    assert export.stats.prompts <= 2
    rest = list(chunks)
    assert len(rest) == 9
    assert export.stats.rows == 10
    assert export.stats.prompts == 10


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def committed_db(request, tmp_path_factory):
    """A database of its own: the snapshot test needs writers that really commit."""
    url, drop = create_database(request.param, tmp_path_factory.mktemp("snap"))
    engine = None
    try:
        migrate(url)
        engine = make_engine(url)
        yield make_session_factory(engine)
    finally:
        if engine is not None:
            engine.dispose()
        drop()


def test_export_is_one_snapshot_while_annotations_are_written(committed_db, monkeypatch):
    factory = committed_db
    with factory() as s:
        project = make_project(s)
        users = [make_user(s) for _ in range(3)]
        prompts = [make_prompt(s, project, k=3) for _ in range(8)]
        first = {p.id: make_annotation(s, p, users[0]).id for p in prompts}
        slug, last, fifth = project.slug, prompts[-1], prompts[4]
        last_id, fifth_id, user_ids = last.id, fifth.id, [u.id for u in users]
    with factory() as s:
        before = export_bytes(s, slug, format="rankings")
    monkeypatch.setattr(exports, "CHUNK_BYTES", 1)
    with factory() as reader:
        export = open_export(
            reader,
            project_slug=slug,
            params=ExportParams(format="rankings"),
            secret=SECRET,
            batch_size=2,
        )
        chunks = export.chunks()
        head = [next(chunks)]
        with factory() as w:  # concurrent writes, committed mid-export
            w.add(Completion(prompt_id=last_id, external_id="late", text="written meanwhile"))
            w.add(
                Annotation(
                    project_id=project.id,
                    prompt_id=last_id,
                    user_id=user_ids[1],
                    status=AnnotationStatus.submitted,
                    ranking=[[c] for c in ids(last)],
                )
            )
            w.add(
                Annotation(
                    project_id=project.id,
                    prompt_id=fifth_id,
                    user_id=user_ids[0],
                    revision=2,
                    supersedes_id=first[fifth_id],
                    status=AnnotationStatus.submitted,
                    ranking=[[c] for c in reversed(ids(fifth))],
                )
            )
            w.commit()
        during = b"".join(head + list(chunks))
    assert during == before
    with factory() as s:
        after = rows(s, slug, format="rankings")
    # A new export sees the writes: the test did change what a later read returns.
    assert len(after) == 9
    assert len(after[-1]["completions"]) == 4


def test_a_session_closed_mid_export_fails_instead_of_mixing_snapshots(committed_db, monkeypatch):
    monkeypatch.setattr(exports, "CHUNK_BYTES", 1)
    with committed_db() as s:
        project, _ = make_many(s, 6)
        slug = project.slug
    reader = committed_db()
    export = open_export(
        reader, project_slug=slug, params=ExportParams(), secret=SECRET, batch_size=2
    )
    chunks = export.chunks()
    next(chunks)
    reader.close()
    with pytest.raises(RuntimeError, match="session was closed"):
        list(chunks)
