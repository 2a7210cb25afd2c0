"""Shared fixtures of the trainer tests: tiny models built from a config (no download), the
golden export fixtures, small synthetic preference sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer with a chat template (tests/tiny_models.py)."""
    from tests.tiny_models import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_model_plain(tmp_path_factory) -> Path:
    """The same tiny model without a chat template (HH-style transcripts)."""
    from tests.tiny_models import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def marker_rankings(n: int, *, k: int = 2, seed: int = 0, marker: str = "blue") -> list[dict]:
    """Rankings rows where the completion containing ``marker`` is ranked first."""
    import random

    rng = random.Random(seed)
    words = ["red", "green", "fox", "dog", "sea", "wind", "poem", "the", "quick", "lazy", "good"]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + f" {i}"
        texts = []
        for j in range(k):
            body = [rng.choice(words) for _ in range(rng.randint(2, 6))]
            if j == 0:
                body.insert(rng.randrange(len(body) + 1), marker)
            texts.append(" ".join(body))
        order = list(range(k))
        rng.shuffle(order)
        completions = [{"id": f"p{i}-{j}", "text": texts[j], "model": None} for j in order]
        ranking = [[f"p{i}-0"]] + [[f"p{i}-{j}"] for j in range(1, k)]
        rows.append(
            {
                "annotation_id": i,
                "prompt": prompt,
                "prompt_id": f"p{i}",
                "completions": completions,
                "ranking": ranking,
                "likert": {},
                "annotator": "ann-000000000001",
            }
        )
    return rows
