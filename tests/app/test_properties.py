"""Hypothesis properties for issue 8's fuzzing: submission validation, pair expansion, the
train/test split and the import parser (what tests/app/test_ranking.py and test_importer.py
do not already cover), plus the parser's nasty inputs sent over HTTP.

Every property is derandomized, so CI runs the same examples each time."""

from __future__ import annotations

import io
import json
import math
import random
from itertools import combinations
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.errors import InvalidInput, PayloadTooLarge, RecordError
from app.importer import PromptIn, open_source, parse_records
from app.models import DEFAULT_FLAGS, Annotation
from app.ranking import count_strict_pairs, expand_pairs, positions, split_of
from app.schemas import SubmitAnnotation
from app.services import tasks
from app.services.tasks import validate_submission
from tests.factories import (
    auth,
    count,
    make_admin_headers,
    make_project,
    make_prompt,
    make_token,
    make_user,
    row_counts,
)

PURE = settings(max_examples=200, derandomize=True, deadline=None)
DB = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BIG = 64 * 1024 * 1024
FLAGS = list(DEFAULT_FLAGS)


def project(*, allow_ties: bool = True, likert: bool = True, rationale: bool = False) -> Any:
    return SimpleNamespace(
        allow_ties=allow_ties, likert=likert, flags=FLAGS, require_rationale=rationale
    )


@st.composite
def partitions(draw: st.DrawFn, ids: list[int], *, ties: bool = True) -> list[list[int]]:
    """``ids`` in a random order, cut into groups (ties) when ``ties``."""
    order = draw(st.permutations(ids))
    groups: list[list[int]] = [[order[0]]]
    for cid in order[1:]:
        if ties and draw(st.booleans()):
            groups[-1].append(cid)
        else:
            groups.append([cid])
    return groups


shown_ids = st.lists(st.integers(1, 2**63 - 1), min_size=2, max_size=9, unique=True)


# --------------------------------------------------------------------------- submissions


def names_one_of(key: str, ids: list[int]) -> bool:
    """A JSON key naming one of ``ids`` ("7", "007")."""
    return key.isascii() and key.isdigit() and int(key) in ids


def submission(raw: dict[str, Any], shown: list[int], proj: Any) -> list[dict[str, Any]]:
    """What POST /leases/{id}/submit does with a body: schema, then the task's rules. A
    ValidationError (422 at the API) is returned as its errors; anything else propagates."""
    try:
        data = SubmitAnnotation.model_validate_json(json.dumps(raw))
    except ValidationError as e:
        return [
            {"field": ".".join(map(str, err["loc"])), "message": err["msg"]} for err in e.errors()
        ]
    return validate_submission(data, shown=shown, project=proj)


@PURE
@given(data=st.data(), shown=shown_ids, allow_ties=st.booleans())
def test_every_partition_of_the_shown_ids_is_accepted(data, shown, allow_ties):
    ranking = data.draw(partitions(shown, ties=allow_ties))
    likert = data.draw(st.dictionaries(st.sampled_from(shown).map(str), st.integers(1, 7)))
    flags = data.draw(
        st.dictionaries(
            st.sampled_from(shown).map(str),
            st.lists(st.sampled_from(FLAGS), unique=True, max_size=3),
        )
    )
    raw = {"ranking": ranking, "likert": likert, "flags": flags, "rationale": "because"}
    if len(shown) == 2 and len(ranking) == 2:
        raw["strength"] = data.draw(st.sampled_from([None, 1, 2]))
    # Ids may come as JSON strings too (HTML forms).
    if data.draw(st.booleans()):
        raw["ranking"] = [[str(c) for c in g] for g in ranking]
    proj = project(allow_ties=allow_ties, rationale=data.draw(st.booleans()))
    assert submission(raw, shown, proj) == []


Mutation = st.sampled_from(
    [
        "missing",
        "repeated",
        "foreign",
        "empty_group",
        "tie_disallowed",
        "likert_range",
        "likert_foreign",
        "likert_type",
        "likert_off",
        "flag_unknown",
        "flag_foreign",
        "flag_twice",
        "id_type",
        "ranking_type",
        "extra_field",
        "no_rationale",
        "strength_on_tie",
        "both_bad_not_tied",
    ]
)


@st.composite
def invalid_submissions(
    draw: st.DrawFn, shown: list[int], mutation: str
) -> tuple[dict[str, Any], dict[str, bool]]:
    """A submission body with one thing wrong, and the project settings that make it wrong."""
    ranking = draw(partitions(shown, ties=True))
    raw: dict[str, Any] = {"ranking": ranking}
    proj: dict[str, bool] = {}
    first = shown[0]
    foreign = max(shown) + 1 if max(shown) < 2**63 - 1 else min(shown) - 1
    if mutation == "missing":
        raw["ranking"] = [g for g in ([c for c in grp if c != first] for grp in ranking) if g]
    elif mutation == "repeated":
        raw["ranking"] = [*ranking, [draw(st.sampled_from(shown))]]
    elif mutation == "foreign":
        raw["ranking"] = [*ranking, [foreign]]
    elif mutation == "empty_group":
        raw["ranking"] = [*ranking, []]
    elif mutation == "tie_disallowed":
        raw["ranking"] = [list(shown)]
        proj = {"allow_ties": False}
    elif mutation == "likert_range":
        raw["likert"] = {str(first): draw(st.integers().filter(lambda v: not 1 <= v <= 7))}
    elif mutation == "likert_foreign":
        raw["likert"] = {draw(st.text(max_size=25).filter(lambda k: not names_one_of(k, shown))): 4}
    elif mutation == "likert_type":
        raw["likert"] = {str(first): draw(st.sampled_from(["x", None, [], {}, 4.5, True]))}
    elif mutation == "likert_off":
        raw["likert"] = {str(first): 4}
        proj = {"likert": False}
    elif mutation == "flag_unknown":
        raw["flags"] = {
            str(first): [
                draw(st.text(min_size=1, max_size=20).filter(lambda f: f.strip() not in FLAGS))
            ]
        }
    elif mutation == "flag_foreign":
        raw["flags"] = {str(foreign): [FLAGS[0]]}
    elif mutation == "flag_twice":
        raw["flags"] = {str(first): [FLAGS[0], FLAGS[0]]}
    elif mutation == "id_type":
        bad = draw(st.sampled_from(["abc", None, 1.5, [], {}, -1, 0, 2**63, "1e3", True]))
        raw["ranking"] = [[bad], *ranking]
    elif mutation == "ranking_type":
        raw["ranking"] = draw(st.sampled_from([None, "1,2", 3, {}, [], [1, 2], [[[1]]]]))
    elif mutation == "extra_field":
        raw["score"] = 1
    elif mutation == "no_rationale":
        raw["rationale"] = draw(st.sampled_from(["", "   ", "\n\t"]))
        proj = {"rationale": True}
    elif mutation == "strength_on_tie":
        raw["ranking"] = [list(shown)]
        raw["strength"] = 1
    elif mutation == "both_bad_not_tied":
        raw["ranking"] = [[c] for c in shown]
        raw["both_bad"] = True
    return raw, proj


PROJECT_MUTATIONS = {"tie_disallowed", "likert_off", "no_rationale"}


@PURE
@given(data=st.data(), shown=shown_ids, mutation=Mutation)
def test_every_invalid_submission_is_rejected_with_errors_never_an_exception(data, shown, mutation):
    assume(min(shown) > 1 or max(shown) < 2**63 - 1)  # room for a foreign id
    raw, proj = data.draw(invalid_submissions(shown, mutation))
    errors = submission(raw, shown, project(**proj))
    assert errors, (mutation, raw)
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)


@pytest.fixture
def open_lease(client, session):
    """An annotator's open lease on a K = 4 task, and the ids it shows."""
    proj = make_project(session, slug="fuzz-submit")
    make_prompt(session, proj)
    user = make_user(session)
    headers = auth(make_token(session, user))
    task = tasks.next_task(session, slug=proj.slug, user=user, exclude=[])
    return client, session, headers, task.lease_id, [c.id for c in task.completions]


@DB
@given(data=st.data(), mutation=Mutation)
def test_invalid_submissions_over_http_are_422_and_write_nothing(open_lease, data, mutation):
    client, session, headers, lease_id, shown = open_lease
    assume(mutation not in PROJECT_MUTATIONS)
    raw, _ = data.draw(invalid_submissions(shown, mutation))
    before = count(session, Annotation)
    r = client.post(f"/api/v1/leases/{lease_id}/submit", json=raw, headers=headers)
    assert r.status_code == 422, (mutation, raw, r.status_code, r.text[:300])
    assert r.json()["errors"]
    assert count(session, Annotation) == before


@settings(DB, max_examples=100)
@given(
    data=st.data(),
    mutation=st.none() | Mutation,
    allow_ties=st.booleans(),
    likert=st.booleans(),
    rationale=st.booleans(),
    flags=st.lists(st.sampled_from(FLAGS), unique=True),
)
def test_a_submit_writes_exactly_what_the_full_validation_accepts(
    session, backend, monkeypatch, data, mutation, allow_ties, likert, rationale, flags
):
    """On PostgreSQL a submit is one statement that checks the annotation against the locked
    lease in SQL (tasks._submit_in_one_statement); whatever it refuses goes the transactional
    way. Whatever the submission and the project's settings: it is recorded exactly when
    validate_submission, given the lease and the project, finds nothing wrong (on PostgreSQL by
    that one statement), and otherwise it is a 422 naming the same problems with nothing
    written."""
    proj = make_project(
        session, allow_ties=allow_ties, likert=likert, require_rationale=rationale, flags=flags
    )
    make_prompt(session, proj, k=data.draw(st.sampled_from([2, 4])))
    proj.completions_per_task = 4
    session.commit()
    user = make_user(session)
    task = tasks.next_task(session, slug=proj.slug, user=user)
    shown = [c.id for c in task.completions]
    if mutation is None:
        raw: dict[str, Any] = {"ranking": data.draw(partitions(shown))}
        raw["likert"] = data.draw(
            st.dictionaries(st.sampled_from(shown).map(str), st.integers(1, 7))
        )
        raw["flags"] = data.draw(
            st.dictionaries(
                st.sampled_from(shown).map(str),
                st.lists(st.sampled_from(FLAGS), unique=True, max_size=2),
            )
        )
        raw["rationale"] = data.draw(st.sampled_from(["", "because"]))
        if len(shown) == 2:
            raw["both_bad"] = len(raw["ranking"]) == 1 and data.draw(st.booleans())
    else:
        raw, _ = data.draw(invalid_submissions(shown, mutation))
    try:
        submitted = SubmitAnnotation.model_validate_json(json.dumps(raw))
    except ValidationError:
        assume(False)
    expected = validate_submission(submitted, shown=shown, project=proj)
    one_statement: list[Any] = []
    fast = tasks._submit_in_one_statement

    def spy(*args: Any, **kwargs: Any) -> Any:
        one_statement.append(fast(*args, **kwargs))
        return one_statement[-1]

    monkeypatch.setattr(tasks, "_submit_in_one_statement", spy)
    before = count(session, Annotation)
    event("refused" if expected else "recorded")
    if expected:
        with pytest.raises(InvalidInput) as refused:
            tasks.submit(session, lease_id=task.lease_id, user=user, data=submitted)
        assert refused.value.errors == expected
        assert count(session, Annotation) == before
        assert one_statement in ([], [None])  # the one statement wrote nothing
        return
    result = tasks.submit(session, lease_id=task.lease_id, user=user, data=submitted)
    annotation = session.get(Annotation, result.annotation_id)
    assert annotation.ranking == submitted.model_dump()["ranking"]
    assert annotation.display_order == shown
    if backend == "postgresql":  # recorded by the one statement
        assert one_statement
        assert one_statement[0] is not None


# --------------------------------------------------------------------------- pairs


@st.composite
def rankings(draw: st.DrawFn) -> list[list[int]]:
    return draw(partitions(draw(st.lists(st.integers(1, 50), min_size=1, max_size=9, unique=True))))


likert_scores = st.dictionaries(st.integers(1, 50).map(str), st.integers(-100, 100))


@PURE
@given(ranking=rankings(), likert=likert_scores, strength=st.sampled_from([None, 1, 2]))
def test_pairs_are_antisymmetric_transitive_never_across_a_tie_with_margins_at_least_zero(
    ranking, likert, strength
):
    pairs = expand_pairs(ranking, likert=likert, strength=strength)
    strict = {(p.chosen, p.rejected) for p in pairs}
    pos = positions(ranking)
    assert len(pairs) == len(strict) == count_strict_pairs(ranking)
    assert all((b, a) not in strict for a, b in strict)  # antisymmetric
    assert all(pos[a] != pos[b] for a, b in strict)  # no pair inside a tie group
    assert all(p.margin >= 0 and math.isfinite(p.margin) for p in pairs)
    for (a, b), (c, d) in combinations(strict, 2):  # transitive
        if b == c:
            assert (a, d) in strict
        if d == a:
            assert (c, b) in strict
    # Every two items of different groups are compared exactly once.
    items = list(pos)
    want = {frozenset(x) for x in combinations(items, 2) if pos[x[0]] != pos[x[1]]}
    assert {frozenset(x) for x in strict} == want


@PURE
@given(ranking=rankings(), likert=likert_scores)
def test_kept_ties_are_symmetric_pairs_with_margin_zero_and_strict_pairs_unchanged(ranking, likert):
    kept = expand_pairs(ranking, likert=likert, ties="keep")
    tied = [p for p in kept if p.tie]
    pos = positions(ranking)
    assert all(pos[p.chosen] == pos[p.rejected] and p.margin == 0 for p in tied)
    assert [p for p in kept if not p.tie] == expand_pairs(ranking, likert=likert)
    assert len(kept) == math.comb(len(pos), 2)  # every unordered pair exactly once


# --------------------------------------------------------------------------- split


@PURE
@given(
    keys=st.lists(st.text(min_size=1, max_size=30), unique=True, min_size=1, max_size=60),
    seed=st.integers(0, 2**63 - 1),
    fraction=st.floats(0, 1),
    shuffle_seed=st.integers(0, 1000),
)
def test_split_is_deterministic_and_independent_of_order(keys, seed, fraction, shuffle_seed):
    first = [split_of(k, seed=seed, test_fraction=fraction) for k in keys]
    shuffled = list(keys)
    random.Random(shuffle_seed).shuffle(shuffled)
    again = {k: split_of(k, seed=seed, test_fraction=fraction) for k in shuffled}
    assert [again[k] for k in keys] == first
    assert set(first) <= {"train", "test"}


@settings(max_examples=20, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), fraction=st.floats(0.01, 0.99), prefix=st.text(max_size=5))
def test_split_fraction_is_close_to_test_fraction_for_any_seed(seed, fraction, prefix):
    n = 4000
    test = sum(
        split_of(f"{prefix}{i}", seed=seed, test_fraction=fraction) == "test" for i in range(n)
    )
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(test - n * fraction) < 5 * sd + 1


# --------------------------------------------------------------------------- import parser

# Storable but awkward text: right-to-left and bidi controls, zero-width and combining marks,
# astral characters, non-characters, line and paragraph separators, BOMs, C0/C1 controls.
ODD = (
    "\u202e\u202d\u2066\u2067\u2069\u200f\u200e\u061c"
    "\u200b\u200c\u200d\u2060\ufeff\u0301\u0489\u20dd"
    "\U0001f600\U0001d11e\U00010348\U0010fffd\ufffe\uffff\ufdd0"
    "\u2028\u2029\u0085\x01\x1b\x7f\x9f\t\r"
    "שלום مرحبا ﷽ Ⅻ ǅ ß ﬃ"
)
odd_text = st.text(
    alphabet=st.sampled_from(ODD) | st.characters(codec="utf-8"), min_size=1, max_size=40
).filter(lambda s: s.strip() and "\x00" not in s)


def parse(data: bytes, *, max_bytes: int = BIG) -> list[PromptIn | RecordError]:
    try:
        return list(parse_records(open_source(io.BytesIO(data), max_bytes=max_bytes)))
    except PayloadTooLarge:
        return []


def check_lines(data: bytes, out: list[PromptIn | RecordError]) -> None:
    last = data.count(b"\n") + 1
    for item in out:
        assert isinstance(item, PromptIn | RecordError)
        assert 1 <= item.line <= last
        if isinstance(item, RecordError):
            assert item.message


@PURE
@given(
    texts=st.lists(odd_text, min_size=1, max_size=4), ascii_only=st.booleans(), array=st.booleans()
)
def test_odd_unicode_round_trips_exactly(texts, ascii_only, array):
    recs = [
        {"id": f"r{i}", "prompt": t, "completions": [t, t + "!"], "metadata": {t: t}}
        for i, t in enumerate(texts)
    ]
    if array:
        data = json.dumps(recs, ensure_ascii=ascii_only).encode()
    else:
        data = b"\n".join(json.dumps(r, ensure_ascii=ascii_only).encode() for r in recs)
    out = parse(data)
    check_lines(data, out)
    assert all(isinstance(r, PromptIn) for r in out), out
    assert [r.messages[0]["content"] for r in out] == texts
    assert [[c.text for c in r.completions] for r in out] == [[t, t + "!"] for t in texts]
    assert [r.metadata for r in out] == [{t: t} for t in texts]


NUL_FORMS = [b"\x00", b"\\u0000", b"\\\\\\u0000", b"a\x00b", b"\\ud800", b"\\udfff\\ud800"]


@PURE
@given(
    where=st.sampled_from(["prompt", "completion", "id", "model", "key", "meta", "outside"]),
    nul=st.sampled_from(NUL_FORMS),
    array=st.booleans(),
    before=st.integers(0, 3),
)
def test_nul_bytes_and_lone_surrogates_give_line_numbered_errors(where, nul, array, before):
    good = [b'{"prompt": "fine %d"}' % i for i in range(before)]
    templates = {
        "prompt": b'{"prompt": "x%sy"}',
        "completion": b'{"prompt": "p", "completions": ["c%s"]}',
        "id": b'{"id": "i%s", "prompt": "p"}',
        "model": b'{"prompt": "p", "completions": [{"text": "t", "model": "m%s"}]}',
        "key": b'{"prompt": "p", "metadata": {"k%s": 1}}',
        "meta": b'{"prompt": "p", "metadata": {"k": ["v%s"]}}',
        "outside": b'{"prompt": "p"%s}',
    }
    bad = templates[where] % nul
    lines = [*good, bad]
    data = (b"[" + b",\n".join(lines) + b"]") if array else b"\n".join(lines)
    out = parse(data)
    check_lines(data, out)
    assert all(isinstance(r, PromptIn) for r in out[:before])
    errors = [r for r in out[before:] if isinstance(r, RecordError)]
    assert errors, (data, out)
    assert all(e.line == before + 1 for e in errors)


@PURE
@given(
    digits=st.integers(20, 5000),
    where=st.sampled_from(["id", "meta", "param", "prompt", "likert"]),
    sign=st.sampled_from(["", "-"]),
    exponent=st.sampled_from(["", "e400", "E-999", ".5e99999"]),
    array=st.booleans(),
)
def test_huge_numbers_are_rows_or_line_numbered_errors(digits, where, sign, exponent, array):
    number = (sign + "9" * digits + exponent).encode()
    rec = {
        "id": b'{"id": %s, "prompt": "p"}',
        "meta": b'{"prompt": "p", "metadata": {"n": %s}}',
        "param": b'{"prompt": "p", "completions": [{"text": "t", "params": {"t": %s}}]}',
        "prompt": b'{"prompt": %s}',
        "likert": b'{"prompt": "p", "metadata": {"n": [%s, {"m": %s}]}}',
    }[where]
    line = rec % ((number,) * rec.count(b"%s"))
    data = b'{"prompt": "ok"}\n' + line if not array else b'[{"prompt": "ok"},\n' + line + b"]"
    out = parse(data)
    check_lines(data, out)
    assert isinstance(out[0], PromptIn)
    assert len(out) == 2
    if isinstance(out[1], PromptIn):
        assert out[1].line == 2
        # Whatever was accepted can be stored as JSON again.
        json.dumps(out[1].metadata)
    else:
        assert out[1].line == 2


@settings(max_examples=10, derandomize=True, deadline=None)
@given(
    size=st.sampled_from([1 << 16, 1 << 20, (1 << 20) + 7, 3 << 20]),
    filler=st.sampled_from([b"x", b"\xd7\xa9", b"\\n", b" ", b"\xf0\x9f\x98\x80"]),
    closed=st.booleans(),
    array=st.booleans(),
)
def test_overlong_lines_are_rows_or_line_numbered_errors(size, filler, closed, array):
    body = filler * (size // len(filler))
    line = b'{"prompt": "' + body + (b'"}' if closed else b"")
    data = b'{"prompt": "a"}\n' + line + b'\n{"prompt": "b"}\n'
    if array:
        data = b'[{"prompt": "a"},\n' + line + b',\n{"prompt": "b"}]'
    out = parse(data)
    check_lines(data, out)
    assert isinstance(out[0], PromptIn)
    if closed:
        assert any(r.line == 2 for r in out)
    else:
        assert any(isinstance(r, RecordError) and r.line == 2 for r in out)


# --------------------------------------------------------------------------- import over HTTP


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


NASTY = [
    b"\x00" * 64,
    b"\xff\xfe\x00{\x00",
    b'{"prompt": "a\x00b"}',
    b'{"prompt": "\\u0000"}',
    b'{"prompt": "\\ud800"}',
    b'[{"prompt": "\\udfff x"}]',
    b"[" * 100_000,
    nested(100_000),
    nested(300),
    b'{"prompt": "p", "metadata": {"n": ' + b"9" * 5000 + b"}}",
    b'[{"prompt": "p", "metadata": {"n": ' + b"9" * 30 + b"}}]",
    b'{"prompt": "p", "metadata": {"n": 1e400}}',
    b'{"prompt": "p", "metadata": {"n": NaN}}',
    b'{"id": ' + b"1" * 300 + b', "prompt": "p"}',
    b'{"prompt": "' + b"\xd7\xa9" * 500_001 + b'"}',
    b'{"prompt": "' + b"x" * (2 << 20),
    b"\xef\xbb\xbf\xef\xbb\xbf{}",
    b'{"prompt": "\xed\xa0\x80"}',
    b"\x1f\x8b\x08\x00garbage",
    b"\x1f\x8b",
]


@pytest.fixture
def import_setup(client, session):
    return client, session, make_admin_headers(session), make_project(session, slug="nasty")


@pytest.mark.parametrize("payload", NASTY, ids=range(len(NASTY)))
def test_nasty_payloads_over_http_are_4xx_and_write_nothing(import_setup, payload):
    client, session, headers, proj = import_setup
    before = row_counts(session)
    for ctype in ("application/x-ndjson", "application/json"):
        r = client.post(
            f"/api/v1/projects/{proj.slug}/prompts",
            content=payload,
            headers={**headers, "Content-Type": ctype},
        )
        assert r.status_code in (413, 422), (r.status_code, r.text[:300])
        body = r.json()
        assert isinstance(body["detail"], str)
        for err in body.get("errors") or []:
            assert err["line"] >= 1
        assert row_counts(session) == before


def test_nasty_payloads_over_a_small_limit_are_413_and_write_nothing(import_setup, settings):
    client, session, headers, proj = import_setup
    settings.max_import_bytes = 1024  # read per request from the same object
    before = row_counts(session)
    for payload in NASTY:
        r = client.post(
            f"/api/v1/projects/{proj.slug}/prompts",
            content=payload,
            headers={**headers, "Content-Type": "application/x-ndjson"},
        )
        want = (413,) if len(payload) > 1024 else (422,)
        assert r.status_code in want, (payload[:50], r.status_code, r.text[:200])
    assert row_counts(session) == before


@DB
@given(
    payload=st.binary(max_size=400)
    | st.lists(
        st.sampled_from([*NASTY[:6], b'{"prompt": "ok"}', b"\n", b"[", b"]", b","]), max_size=6
    ).map(b"".join),
    ctype=st.sampled_from(
        ["application/x-ndjson", "application/json", "text/csv", "multipart/form-data", ""]
    ),
)
def test_random_bodies_over_http_never_500(import_setup, payload, ctype):
    client, session, headers, proj = import_setup
    before = row_counts(session)
    extra = {"Content-Type": ctype} if ctype else {}
    r = client.post(
        f"/api/v1/projects/{proj.slug}/prompts", content=payload, headers={**headers, **extra}
    )
    assert r.status_code in (201, 400, 413, 415, 422), (r.status_code, r.text[:300])
    if r.status_code != 201:
        assert isinstance(r.json()["detail"], str)
        assert row_counts(session) == before
