"""app.services.imports.import_prompts against SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.errors import ImportRejected, NotFound, PayloadTooLarge
from app.importer import content_id
from app.models import Completion, Prompt
from app.schemas import ImportResult
from app.services.imports import BATCH_RECORDS, MAX_ERRORS, import_prompts
from tests.conftest import unavailable
from tests.factories import make_project, make_prompt, row_counts

HH_FILE = Path(__file__).resolve().parents[3] / "shared/data/hh-harmless-1800.jsonl.gz"
HH_BAD_LINES = [87, 517, 926, 1104, 1255, 1689]
BIG = 64 * 1024 * 1024


def jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def run(session: Session, slug: str, data: bytes, *, max_bytes: int = BIG) -> ImportResult:
    return import_prompts(session, project_slug=slug, source=io.BytesIO(data), max_bytes=max_bytes)


def rejected(session: Session, slug: str, data: bytes, **kw: Any) -> ImportRejected:
    before = row_counts(session)
    with pytest.raises(ImportRejected) as exc:
        run(session, slug, data, **kw)
    assert row_counts(session) == before
    assert exc.value.status == 422
    return exc.value


def result(created: int, skipped: int, c_created: int, c_skipped: int) -> ImportResult:
    return ImportResult(
        created=created,
        skipped=skipped,
        completions_created=c_created,
        completions_skipped=c_skipped,
    )


def prompts_of(session: Session, project_id: int) -> list[Prompt]:
    q = select(Prompt).where(Prompt.project_id == project_id).order_by(Prompt.id)
    return list(session.scalars(q))


def completions_of(session: Session, prompt_id: int) -> list[Completion]:
    q = select(Completion).where(Completion.prompt_id == prompt_id).order_by(Completion.id)
    return list(session.scalars(q))


def good(n: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"g{i}", "prompt": f"prompt {i}", "completions": [f"a{i}", f"b{i}"]}
        for i in range(start, start + n)
    ]


# --------------------------------------------------------------------------- happy paths


def test_import_creates_prompts_and_completions(session):
    project = make_project(session)
    data = jsonl(
        {
            "id": "p-1",
            "prompt": "Write a haiku about spring.",
            "completions": [{"id": "a", "text": "Cherry petals fall", "model": "m1"}, "plain"],
            "metadata": {"source": "demo", "n": [1, 2.5, None, "é"]},
        },
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi 👋"},
            ],
            "completions": [{"text": "Hello", "params": {"temperature": 0.7, "stop": ["\n"]}}],
        },
        {"id": 3, "prompt": "no completions yet"},
    )
    assert run(session, project.slug, data) == result(3, 0, 3, 0)

    p1, p2, p3 = prompts_of(session, project.id)
    assert (p1.external_id, p2.external_id, p3.external_id) == (
        "p-1",
        content_id(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
        ),
        "3",
    )
    assert p1.messages == [{"role": "user", "content": "Write a haiku about spring."}]
    assert p1.metadata_ == {"source": "demo", "n": [1, 2.5, None, "é"]}
    assert p2.messages[1] == {"role": "user", "content": "Hi 👋"}
    assert p3.metadata_ == {}
    c = completions_of(session, p1.id)
    assert [(x.external_id, x.text, x.model, x.params) for x in c] == [
        ("a", "Cherry petals fall", "m1", {}),
        (content_id("plain"), "plain", None, {}),
    ]
    (c2,) = completions_of(session, p2.id)
    assert c2.params == {"temperature": 0.7, "stop": ["\n"]}
    assert completions_of(session, p3.id) == []


@pytest.mark.parametrize("kind", ["array", "gzip-jsonl", "gzip-array", "bom"])
def test_other_framings_import_the_same(session, kind):
    project = make_project(session)
    objs = good(3)
    plain = json.dumps(objs, indent=2).encode() if kind.endswith("array") else jsonl(*objs)
    if kind.startswith("gzip"):
        data = gzip.compress(plain)
    elif kind == "bom":
        data = b"\xef\xbb\xbf" + plain
    else:
        data = plain
    assert run(session, project.slug, data) == result(3, 0, 6, 0)
    assert [p.external_id for p in prompts_of(session, project.id)] == ["g0", "g1", "g2"]


def test_reimport_is_idempotent(session):
    project = make_project(session)
    data = jsonl(*good(5), {"prompt": "no id", "completions": ["x"]})
    assert run(session, project.slug, data) == result(6, 0, 11, 0)
    counts = row_counts(session)
    assert run(session, project.slug, data) == result(0, 6, 0, 11)
    assert run(session, project.slug, gzip.compress(data)) == result(0, 6, 0, 11)
    assert row_counts(session) == counts


def test_new_completions_for_existing_prompts_are_added(session):
    project = make_project(session)
    run(session, project.slug, jsonl({"id": "p", "prompt": "q", "completions": ["a", "b"]}))
    again = jsonl(
        {"id": "p", "prompt": "q", "completions": ["b", "c"]},
        {"id": "new", "prompt": "n", "completions": ["z"]},
    )
    assert run(session, project.slug, again) == result(1, 1, 2, 1)
    (p, _) = prompts_of(session, project.id)
    assert [c.text for c in completions_of(session, p.id)] == ["a", "b", "c"]


def test_existing_prompts_are_left_as_they_were(session):
    project = make_project(session)
    run(session, project.slug, jsonl({"id": "p", "prompt": "original", "metadata": {"v": 1}}))
    changed = {"id": "p", "prompt": "original", "metadata": {"v": 2}}
    assert run(session, project.slug, jsonl(changed)) == result(0, 1, 0, 0)
    (p,) = prompts_of(session, project.id)
    assert p.messages == [{"role": "user", "content": "original"}]
    assert p.metadata_ == {"v": 1}


def test_an_existing_id_with_another_prompt_is_rejected(session):
    project = make_project(session)
    run(session, project.slug, jsonl({"id": "p", "prompt": "original", "completions": ["a"]}))
    before = row_counts(session)
    data = jsonl(
        {"id": "fresh", "prompt": "new one", "completions": ["x"]},
        {"id": "p", "prompt": "changed", "completions": ["b"]},
    )
    err = rejected(session, project.slug, data)
    assert err.errors == [
        {
            "line": 2,
            "field": "id",
            "message": "id 'p' already exists in this project with a different prompt",
        }
    ]
    assert row_counts(session) == before


def test_prompts_from_factories_are_skipped_by_external_id(session):
    project = make_project(session)
    existing = make_prompt(session, project, k=2, external_id="ext-1", text="same text")
    data = jsonl({"id": "ext-1", "prompt": "same text", "completions": [{"id": "c0", "text": "t"}]})
    assert run(session, project.slug, data) == result(0, 1, 0, 1)
    assert len(completions_of(session, existing.id)) == 2


def test_records_without_id_and_the_same_prompt_merge(session):
    project = make_project(session)
    data = jsonl(
        {"prompt": "same", "completions": ["a"]},
        {"prompt": "other"},
        {"prompt": [{"role": "user", "content": "same"}], "completions": ["a", "b"]},
    )
    assert run(session, project.slug, data) == result(2, 0, 2, 1)
    same, other = prompts_of(session, project.id)
    assert same.external_id == content_id([{"role": "user", "content": "same"}])
    assert [c.text for c in completions_of(session, same.id)] == ["a", "b"]
    assert completions_of(session, other.id) == []


def test_merging_works_across_batches(session):
    project = make_project(session)
    filler = good(BATCH_RECORDS + 10)
    data = jsonl(
        {"prompt": "same", "completions": ["a"]},
        *filler,
        {"prompt": "same", "completions": ["a", "b"]},
    )
    assert run(session, project.slug, data) == result(BATCH_RECORDS + 11, 0, 2 * len(filler) + 2, 1)


def test_same_prompt_in_another_project_is_separate(session):
    a, b = make_project(session), make_project(session)
    data = jsonl({"id": "x", "prompt": "q", "completions": ["c"]}, {"prompt": "no id"})
    assert run(session, a.slug, data) == result(2, 0, 1, 0)
    assert run(session, b.slug, data) == result(2, 0, 1, 0)
    assert len(prompts_of(session, a.id)) == len(prompts_of(session, b.id)) == 2


def test_many_records_over_several_batches(session):
    project = make_project(session)
    n = 2 * BATCH_RECORDS + 500
    assert run(session, project.slug, jsonl(*good(n))) == result(n, 0, 2 * n, 0)
    ids = [p.external_id for p in prompts_of(session, project.id)]
    assert ids == [f"g{i}" for i in range(n)]
    # A second import overlapping the first half.
    again = jsonl(*good(n // 2, start=n - 100))
    assert run(session, project.slug, again) == result(n // 2 - 100, 100, n - 200, 200)


def test_unicode_and_json_values_round_trip(session):
    project = make_project(session)
    meta = {"nested": {"list": [True, False, None, 0, -1, 2**62, 1.5e-300]}, "😀": "ü\\u0000"}
    data = jsonl({"id": "u", "prompt": "𝄞 ü\r\n\ttab", "metadata": meta})
    run(session, project.slug, data)
    (p,) = prompts_of(session, project.id)
    session.expire_all()
    p = session.get(Prompt, p.id)
    assert p.messages == [{"role": "user", "content": "𝄞 ü\r\n\ttab"}]
    assert p.metadata_ == meta


# --------------------------------------------------------------------------- rejection


@pytest.mark.parametrize(
    "position",
    [0, 1, BATCH_RECORDS - 1, BATCH_RECORDS, BATCH_RECORDS + 1, 2 * BATCH_RECORDS + 7, -1],
)
def test_a_bad_record_anywhere_rejects_everything(session, position):
    project = make_project(session)
    existing = make_prompt(session, project)
    records: list[Any] = good(2 * BATCH_RECORDS + 50)
    index = position if position >= 0 else len(records)
    records.insert(index, {"id": "bad", "prompt": ""})
    err = rejected(session, project.slug, jsonl(*records))
    assert err.total == 1
    assert err.errors == [{"line": index + 1, "field": "prompt", "message": "must not be empty"}]
    assert err.message == "import rejected: 1 error; nothing was written"
    assert [p.id for p in prompts_of(session, project.id)] == [existing.id]


def test_a_bad_record_after_existing_prompts_rolls_back_new_completions(session):
    project = make_project(session)
    run(session, project.slug, jsonl(*good(BATCH_RECORDS + 5)))
    before = row_counts(session)
    records = [
        {"id": f"g{i}", "prompt": f"prompt {i}", "completions": [f"new {i}"]}
        for i in range(BATCH_RECORDS + 5)
    ]
    records.append({"id": "x", "prompt": "x", "completions": [""]})
    err = rejected(session, project.slug, jsonl(*records))
    assert err.errors[0]["line"] == BATCH_RECORDS + 6
    assert row_counts(session) == before


def test_every_error_is_counted_but_only_100_are_listed(session):
    project = make_project(session)
    records: list[Any] = []
    for i in range(150):
        records += [{"prompt": f"ok {i}"}, {"prompt": i}]
    err = rejected(session, project.slug, jsonl(*records))
    assert err.total == 150
    assert len(err.errors) == MAX_ERRORS == 100
    assert [e["line"] for e in err.errors] == [2 * i + 2 for i in range(100)]
    assert err.message == "import rejected: 150 errors (first 100 shown); nothing was written"
    assert err.body()["errors"] == err.errors


def test_errors_from_framing_and_validation_together(session):
    project = make_project(session)
    data = b'{"prompt": "a"}\n{broken\n{"id": 1, "prompt": "b"}\n{"id": "1", "prompt": "c"}\n'
    err = rejected(session, project.slug, data)
    assert err.total == 2
    assert err.errors[0]["line"] == 2
    assert err.errors[1] == {
        "line": 4,
        "field": "id",
        "message": "duplicate id '1' (first on line 3)",
    }


@pytest.mark.parametrize("data", [b"", b"\n \n", b"[]", gzip.compress(b"")])
def test_an_empty_upload_is_rejected(session, data):
    project = make_project(session)
    err = rejected(session, project.slug, data)
    assert err.errors == [{"line": 1, "field": None, "message": "the upload contains no records"}]


def test_a_truncated_gzip_is_rejected(session):
    project = make_project(session)
    packed = gzip.compress(jsonl(*good(2 * BATCH_RECORDS)))
    err = rejected(session, project.slug, packed[: len(packed) // 2])
    assert err.total == 1
    (e,) = err.errors
    assert e["message"].startswith("unreadable compressed data")
    assert e["line"] >= 1


def test_a_corrupt_gzip_is_rejected(session):
    project = make_project(session)
    packed = bytearray(gzip.compress(jsonl(*good(50))))
    packed[len(packed) // 2] ^= 0xFF
    err = rejected(session, project.slug, bytes(packed))
    assert err.errors[-1]["message"].startswith("unreadable compressed data")


def test_error_list_stays_capped_when_the_gzip_is_also_truncated(session):
    project = make_project(session)
    # More than the parser's 1 MiB read-ahead, so the 150 bad records are seen before the end.
    filler = ({"id": i, "prompt": f"{i} " + "x" * 1000} for i in range(3000))
    packed = gzip.compress(jsonl(*({"prompt": i} for i in range(150)), *filler))
    err = rejected(session, project.slug, packed[: len(packed) - 100])
    assert err.total == 151
    assert len(err.errors) <= MAX_ERRORS


def test_unknown_project_is_not_found(session):
    before = row_counts(session)
    with pytest.raises(NotFound) as exc:
        run(session, "no-such-project", jsonl(*good(2)))
    assert exc.value.message == "project 'no-such-project' not found"
    assert row_counts(session) == before


def test_payload_too_large_midway_rolls_back_written_batches(session):
    project = make_project(session)
    records = [{"id": i, "prompt": "x" * 500, "completions": [f"c{i}"]} for i in range(5000)]
    data = jsonl(*records)
    assert len(data) > 2 * 1024 * 1024  # the limit is hit after the first 1 MiB read
    before = row_counts(session)
    with pytest.raises(PayloadTooLarge):
        run(session, project.slug, data, max_bytes=2 * 1024 * 1024)
    assert row_counts(session) == before


def test_a_gzip_bomb_is_too_large_and_writes_nothing(session):
    project = make_project(session)
    packed = gzip.compress(jsonl(*({"prompt": "same"} for _ in range(20_000))))
    before = row_counts(session)
    with pytest.raises(PayloadTooLarge) as exc:
        run(session, project.slug, packed, max_bytes=100_000)
    assert "decompressed" in exc.value.message
    assert row_counts(session) == before


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "x", "completions": [{"text": "t", "params": {"s": "\u0000"}}]}, "params"),
        ({"prompt": "x", "metadata": {"s": "a\u0000"}}, "metadata"),
        ({"prompt": "nul \u0000"}, "prompt"),
    ],
)
def test_values_postgresql_cannot_store_are_rejected_up_front(session, record, field):
    project = make_project(session)
    err = rejected(session, project.slug, jsonl(*good(3), record))
    (e,) = err.errors
    assert e["line"] == 4
    assert e["field"].endswith(field)
    assert e["message"] == "contains a NUL character"


# --------------------------------------------------------------------------- HH-RLHF sample


@pytest.fixture(scope="module")
def hh_lines() -> list[bytes]:
    if not HH_FILE.is_file():
        unavailable("the HH-RLHF sample", f"{HH_FILE} is missing")
    lines = gzip.decompress(HH_FILE.read_bytes()).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def conversation_key(transcript: str) -> tuple[tuple[str, str], ...]:
    """The conversation before the last Assistant turn: records with equal keys merge."""
    head = transcript[: transcript.rindex("\n\nAssistant:")]
    parts = _TURN.split(head)[1:]
    return tuple(zip(parts[0::2], parts[1::2], strict=True))


def last_answer(transcript: str) -> str:
    return transcript[transcript.rindex("\n\nAssistant:") + len("\n\nAssistant:") :].removeprefix(
        " "
    )


def test_hh_file_with_bad_records_is_rejected_whole(session, hh_lines):
    assert len(hh_lines) == 1800
    project = make_project(session)
    err = rejected(session, project.slug, HH_FILE.read_bytes())
    assert err.total == len(HH_BAD_LINES)
    assert [e["line"] for e in err.errors] == HH_BAD_LINES
    assert {e["field"] for e in err.errors} == {"chosen"}
    assert [e["message"] for e in err.errors] == [
        "the last Assistant turn is empty",
        "the last Assistant turn is empty",
        "the last Assistant turn is empty",
        "the last Assistant turn is empty",
        "the turn before the last Assistant turn must be a Human turn",
        "the turn before the last Assistant turn must be a Human turn",
    ]
    assert prompts_of(session, project.id) == []


@pytest.mark.parametrize("compress", [True, False])
def test_hh_file_without_the_bad_records_imports(session, hh_lines, compress):
    bad = set(HH_BAD_LINES)
    kept = [line for n, line in enumerate(hh_lines, start=1) if n not in bad]
    assert len(kept) == 1794
    data = b"\n".join(kept) + b"\n"
    if compress:
        data = gzip.compress(data)

    conversations: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for raw in kept:
        rec = json.loads(raw)
        key = conversation_key(rec["chosen"])
        assert key == conversation_key(rec["rejected"])
        answers = conversations.setdefault(key, set())
        answers |= {last_answer(rec["chosen"]), last_answer(rec["rejected"])}
    expected_prompts = len(conversations)
    expected_completions = sum(len(a) for a in conversations.values())
    assert expected_prompts < 1794  # the sample repeats some conversations
    duplicate_completions = 2 * 1794 - expected_completions

    project = make_project(session)
    before = row_counts(session)
    got = run(session, project.slug, data)
    assert got == result(expected_prompts, 0, expected_completions, duplicate_completions)
    after = row_counts(session)
    assert after["prompt"] - before["prompt"] == expected_prompts
    assert after["completion"] - before["completion"] == expected_completions

    # Spot-check one multi-turn record end to end.
    multi = next(json.loads(raw) for raw in kept if json.loads(raw)["chosen"].count("Human:") > 1)
    key = conversation_key(multi["chosen"])
    messages = [{"role": "user" if who == "Human" else "assistant", "content": c} for who, c in key]
    (p,) = session.scalars(
        select(Prompt).where(
            Prompt.project_id == project.id, Prompt.external_id == content_id(messages)
        )
    )
    assert p.messages == messages
    texts = {c.text for c in completions_of(session, p.id)}
    assert {last_answer(multi["chosen"]), last_answer(multi["rejected"])} <= texts

    # Importing it again changes nothing.
    assert run(session, project.slug, data) == result(
        0, expected_prompts, 0, expected_completions + duplicate_completions
    )
    assert row_counts(session) == after


def test_a_bulk_import_refreshes_postgresql_statistics(session, backend):
    """The task queue's plans need statistics: a large import runs ANALYZE afterwards."""
    project = make_project(session)
    records = [{"id": f"s{i}", "prompt": f"q {i}", "completions": ["a", "b"]} for i in range(600)]
    run(session, project.slug, jsonl(*records))
    if backend == "postgresql":
        reltuples = session.execute(
            text("SELECT reltuples FROM pg_class WHERE relname = 'prompt'")
        ).scalar_one()
        assert reltuples >= 600
