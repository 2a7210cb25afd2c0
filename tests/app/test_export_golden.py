"""The export contract, byte for byte: ``tests/fixtures/export_*.jsonl`` (read by the trainer).

Fixed data (explicit ids, timestamps and secret key) goes into a fresh database of its own,
is exported with the default parameters, and must equal the committed files exactly; on
PostgreSQL too (same ids, so the same bytes). ``PREFERO_UPDATE_GOLDEN=1`` rewrites the files
(review the diff: a change is a change of the contract, see ``tests/fixtures/README.md``).

Two projects: ``golden-text`` (single-turn prompts, so ``prompt`` / ``chosen`` / ``rejected``
are strings; K = 4 with Likert scores, ties, flags, two annotators on one prompt, a superseded
revision, a skipped annotation, Unicode) and ``golden-chat`` (chat prompts with a system
message and earlier turns, so message lists; K = 2 with strengths and a "both bad" tie).
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import datasets
import orjson
import pytest
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import (
    Annotation,
    AnnotationStatus,
    Completion,
    Project,
    Prompt,
    Role,
    User,
)
from app.schemas import ExportParams
from app.services.exports import open_export
from tests.conftest import create_database, migrate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SECRET = "golden-secret-key"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
UPDATE = os.environ.get("PREFERO_UPDATE_GOLDEN") == "1"

GOLDEN = {
    # file name → (project slug, export parameters)
    "export_pairs.jsonl": ("golden-text", {"format": "pairs"}),
    "export_rankings.jsonl": ("golden-text", {"format": "rankings"}),
    "export_consensus.jsonl": ("golden-text", {"format": "consensus"}),
    "export_hh.jsonl": ("golden-text", {"format": "hh"}),
    "export_pairs_chat.jsonl": ("golden-chat", {"format": "pairs"}),
    "export_rankings_chat.jsonl": ("golden-chat", {"format": "rankings"}),
}


def _at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def build_golden(session: Session) -> None:
    """The fixed data set (explicit ids: the same rows on SQLite and PostgreSQL)."""
    session.add_all(
        [
            User(id=1, username="alice", role=Role.annotator, created_at=T0),
            User(id=2, username="bob", role=Role.annotator, created_at=T0),
            User(id=3, username="carol", role=Role.annotator, created_at=T0),
            User(id=4, username="admin", role=Role.admin, created_at=T0),
        ]
    )
    session.add_all(
        [
            Project(
                id=1, name="Golden text", slug="golden-text", completions_per_task=4, overlap=2
            ),
            Project(
                id=2,
                name="Golden chat",
                slug="golden-chat",
                completions_per_task=2,
                overlap=3,
                likert=False,
            ),
        ]
    )
    session.flush()

    def prompt(pid: int, project: int, ext: str, messages: object, texts: list[str]) -> None:
        p = Prompt(
            id=pid,
            project_id=project,
            external_id=ext,
            messages=messages,
            metadata_={},
            created_at=T0,
        )
        session.add(p)
        session.flush()
        for i, body in enumerate(texts):
            session.add(
                Completion(
                    id=pid * 10 + i + 1,
                    prompt_id=pid,
                    external_id=f"{ext}-{'abcd'[i]}",
                    text=body,
                    model=("model-small", "model-large")[i % 2],
                    params={},
                    created_at=T0,
                )
            )
        session.flush()

    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    prompt(
        1,
        1,
        "photosynthesis",
        user("Explain photosynthesis in one sentence."),
        [
            "Plants turn light, water and CO2 into sugar and oxygen.",
            'Photosynthesis is how plants "eat" light.\nThat is all.',
            "Chlorophyll absorbs light to make glucose from CO₂ and water, releasing O₂.",
            "It is when plants sleep at night.",
        ],
    )
    prompt(
        2,
        1,
        "haiku-mer",
        user("Écris un haïku sur la mer 🌊"),
        [
            "Vagues sur le sable —\nle sel garde la mémoire\ndes pas effacés",
            "La mer est bleue.",
            "海の音\n遠くの舟が\n夢を見る",
            "Mer calme, ciel gris,\nune mouette s'envole —\nle silence reste",
        ],
    )
    prompt(3, 1, "unannotated", user("A prompt nobody has annotated yet."), ["w", "x", "y", "z"])
    prompt(
        4,
        1,
        "capital",
        user("What is the capital of Australia?"),
        ["Canberra.", "Sydney.", "Canberra — not Sydney, a common mistake.", "Melbourne."],
    )
    prompt(
        5,
        2,
        "sum",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        ["4", "Four, because two and two make four."],
    )
    prompt(
        6,
        2,
        "db-joke",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about databases."},
        ],
        [
            "A SQL query walks into a bar, sees two tables and asks: may I join you?",
            "Databases are not funny.",
        ],
    )

    def annotate(aid: int, prompt_id: int, user_id: int, minutes: int, **fields: object) -> None:
        values: dict[str, object] = {
            "id": aid,
            "project_id": 1 if prompt_id <= 4 else 2,
            "prompt_id": prompt_id,
            "user_id": user_id,
            "status": AnnotationStatus.submitted,
            "created_at": _at(minutes),
            "likert": {},
            "flags": {},
            "rationale": "",
        }
        values.update(fields)
        session.add(Annotation(**values))
        session.flush()

    # photosynthesis: two annotators (agreeing on 5 of the 5 pairs both rank strictly).
    annotate(
        1,
        1,
        1,
        0,
        ranking=[[13], [11, 12], [14]],
        likert={"11": 5, "12": 5, "13": 7, "14": 1},
        flags={"14": ["hallucination"]},
        rationale="c is precise; d is wrong.",
        display_order=[12, 14, 11, 13],
        duration_ms=41_250,
    )
    annotate(
        2,
        1,
        2,
        5,
        ranking=[[13], [11], [12], [14]],
        likert={"11": 6, "12": 4, "13": 6, "14": 1},
        flags={"14": ["hallucination", "fails to follow the instruction"]},
        display_order=[11, 12, 13, 14],
        duration_ms=30_000,
    )
    # haiku: alice's first revision is superseded by her second; carol skipped.
    annotate(
        3,
        2,
        1,
        10,
        ranking=[[22], [21], [23], [24]],
        likert={"21": 4, "22": 5, "23": 3, "24": 2},
        display_order=[24, 23, 22, 21],
        duration_ms=20_000,
    )
    annotate(
        4,
        2,
        1,
        20,
        revision=2,
        supersedes_id=3,
        ranking=[[23], [21, 24], [22]],
        likert={"21": 5, "22": 2, "23": 7, "24": 5},
        rationale="Le haïku japonais est le plus juste ; « La mer est bleue. » est plat.",
        display_order=[24, 23, 22, 21],
        duration_ms=55_500,
    )
    annotate(
        5,
        2,
        3,
        25,
        status=AnnotationStatus.skipped,
        ranking=[],
        skip_reason="I cannot read Japanese.",
        display_order=[21, 22, 23, 24],
        duration_ms=3_000,
    )
    # capital: no Likert scores (margin 1), two tied pairs.
    annotate(
        6,
        4,
        2,
        30,
        ranking=[[43, 41], [42, 44]],
        display_order=[44, 43, 42, 41],
        duration_ms=12_000,
    )
    # sum (chat, K = 2): much better.
    annotate(
        7,
        5,
        1,
        40,
        ranking=[[51], [52]],
        strength=2,
        display_order=[52, 51],
        duration_ms=8_000,
    )
    # db-joke (chat, K = 2): slightly better; carol found both bad (a tie).
    annotate(
        8,
        6,
        2,
        45,
        ranking=[[61], [62]],
        strength=1,
        display_order=[61, 62],
        duration_ms=9_000,
    )
    annotate(
        9,
        6,
        3,
        50,
        ranking=[[61, 62]],
        both_bad=True,
        display_order=[62, 61],
        duration_ms=7_000,
    )
    session.commit()


def export_bytes(session: Session, slug: str, **params: object) -> bytes:
    export = open_export(session, project_slug=slug, params=ExportParams(**params), secret=SECRET)
    out = io.BytesIO()
    export.write(out)
    return out.getvalue()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def golden_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    url, drop = create_database(request.param, tmp_path_factory.mktemp("golden"))
    engine = None
    try:
        migrate(url)
        engine = make_engine(url)
        with Session(engine, expire_on_commit=False, autoflush=False) as session:
            build_golden(session)
            yield request.param, session
    finally:
        if engine is not None:
            engine.dispose()
        drop()  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_export_matches_golden_file(golden_session, name: str) -> None:
    backend, session = golden_session
    slug, params = GOLDEN[name]
    got = export_bytes(session, slug, **params)
    path = FIXTURES / name
    if UPDATE and backend == "sqlite":
        path.write_bytes(got)
    assert path.exists(), f"{path} is missing: run with PREFERO_UPDATE_GOLDEN=1"
    want = path.read_bytes()
    if got != want:  # a readable diff: row by row
        assert [orjson.loads(x) for x in got.splitlines()] == [
            orjson.loads(x) for x in want.splitlines()
        ]
    assert got == want


def test_golden_pairs_contents() -> None:
    """What the fixture shows, spelled out (so a regenerated file is checked by hand once)."""
    rows = [orjson.loads(x) for x in (FIXTURES / "export_pairs.jsonl").read_bytes().splitlines()]
    by_annotation: dict[int, list[dict]] = {}
    for r in rows:
        by_annotation.setdefault(r["annotation_id"], []).append(r)
    # alice's first haiku revision (3) is superseded, carol's skip (5) is not an annotation.
    assert sorted(by_annotation) == [1, 2, 4, 6]
    # C(4,2) minus tied pairs: [[c],[a,b],[d]] → 5 strict pairs; [[c],[a],[b],[d]] → 6;
    # [[c],[a,d],[b]] → 5; [[c,a],[b,d]] → 4.
    assert [len(by_annotation[a]) for a in (1, 2, 4, 6)] == [5, 6, 5, 4]
    first = by_annotation[1][0]
    assert first["prompt"] == "Explain photosynthesis in one sentence."
    assert (first["chosen_id"], first["rejected_id"]) == ("photosynthesis-c", "photosynthesis-a")
    assert first["margin"] == 2.0  # Likert 7 − 5
    assert (first["position_chosen"], first["position_rejected"]) == (3, 2)
    assert first["group_id"] == "a1"
    assert first["tie"] is False
    assert first["annotator"].startswith("ann-")
    assert "alice" not in first["annotator"]
    assert all(r["margin"] == 1.0 for r in by_annotation[6])  # no Likert: margin 1
    assert {r["created_at"] for r in by_annotation[4]} == {"2026-11-01T09:20:00Z"}
    chat = [
        orjson.loads(x) for x in (FIXTURES / "export_pairs_chat.jsonl").read_bytes().splitlines()
    ]
    assert [(r["prompt_id"], r["margin"]) for r in chat] == [("sum", 2.0), ("db-joke", 1.0)]
    assert chat[0]["prompt"][0] == {"role": "system", "content": "You are a terse assistant."}
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("name", ["export_pairs.jsonl", "export_pairs_chat.jsonl"])
def test_golden_pairs_load_with_datasets(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ds = datasets.load_dataset(
        "json", data_files=str(FIXTURES / name), split="train", cache_dir=str(tmp_path / "c")
    )
    want = [orjson.loads(x) for x in (FIXTURES / name).read_bytes().splitlines()]
    assert len(ds) == len(want)
    assert ds.column_names == list(want[0])
    assert ds[0]["prompt"] == want[0]["prompt"]
    assert ds[0]["chosen"] == want[0]["chosen"]
