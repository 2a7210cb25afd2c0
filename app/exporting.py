"""Rows of the export formats, built from plain data (pure: no database access).

``app.services.exports`` reads annotations, prompts and completions in batches and hands them
to the builders here; the rules (ids, prompt shape, margins, positions, agreement, the HH-RLHF
transcript) live in this module and are documented in ``docs/export.md``. The JSON Lines
writer serialises each prompt and completion text once per prompt: the builders take the
pre-serialised pieces of a :class:`PromptData` (``orjson.Fragment``) when ``fragments`` is
set, and the plain Python values (for Parquet) otherwise; ``pairs`` lines, the hot path, are
assembled from bytes by :func:`pair_lines`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import orjson

from app.ranking import consensus_ranking, expand_pairs, pairwise_agreement

HH_HUMAN = "\n\nHuman: "
HH_ASSISTANT = "\n\nAssistant: "
SCORE_DIGITS = 6
"""Bradley–Terry scores in ``consensus`` rows are rounded to this many decimals."""

JSON_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE


def is_single_turn(messages: Sequence[dict[str, str]]) -> bool:
    """One user message and nothing else: exported as a plain string (unless chat is forced)."""
    return len(messages) == 1 and messages[0].get("role") == "user"


def prompt_value(messages: list[dict[str, str]], *, chat: bool) -> str | list[dict[str, str]]:
    """The ``prompt`` field: the message list for a chat export, else the user's text."""
    if chat:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if not is_single_turn(messages):
        raise ValueError("a text-shaped export needs single-turn prompts")
    return messages[0]["content"]


def answer_value(text: str, *, chat: bool) -> str | list[dict[str, str]]:
    """The ``chosen`` / ``rejected`` field: ``[{"role": "assistant", …}]`` for chat, else text."""
    return [{"role": "assistant", "content": text}] if chat else text


@dataclass(slots=True)
class CompletionData:
    id: int
    external_id: str
    text: str
    model: str | None
    answer: Any = None
    """``answer_value`` of the text (a Fragment when the builder serialises to JSON)."""
    # Pieces of its ``pairs`` JSON Lines, serialised once per prompt (see ``pair_lines``):
    as_chosen: bytes = b""
    """``{"prompt":…,"chosen":…``"""
    as_rejected: bytes = b""
    """``,"rejected":…,"margin":``"""
    chosen_id: bytes = b""
    """``,"prompt_id":…,"chosen_id":…``"""
    rejected_id: bytes = b""
    """``,"rejected_id":…``"""


@dataclass(slots=True)
class PromptData:
    id: int
    external_id: str
    messages: list[dict[str, str]]
    completions: dict[int, CompletionData]
    """Database id → completion, in id order."""
    prompt: Any = None
    """``prompt_value`` (a Fragment when the builder serialises to JSON)."""
    completions_json: Any = None
    """The ``completions`` list of ``rankings`` / ``consensus`` rows."""

    @classmethod
    def build(
        cls,
        *,
        id: int,
        external_id: str,
        messages: list[dict[str, str]],
        completions: Sequence[tuple[int, str, str, str | None]],
        chat: bool,
        fragments: bool,
        listing: bool = True,
    ) -> PromptData:
        """``completions`` are ``(id, external_id, text, model)`` in id order. With
        ``fragments`` every text is serialised here, once (the ``completions`` list of
        rankings and consensus rows only with ``listing``)."""
        comps: dict[int, CompletionData] = {}
        listed = []
        dumps = orjson.dumps
        for cid, ext, text, model in completions:
            answer: Any = answer_value(text, chat=chat)
            comps[cid] = CompletionData(cid, ext, text, model, answer)
            listed.append({"id": ext, "text": text, "model": model})
        value: Any = prompt_value(messages, chat=chat)
        prompt = cls(id, external_id, messages, comps, value, listed)
        if fragments:
            encoded = dumps(value)
            prompt.prompt = orjson.Fragment(encoded)
            if listing:
                prompt.completions_json = orjson.Fragment(dumps(listed))
            head = b'{"prompt":' + encoded + b',"chosen":'
            ids = b',"prompt_id":' + dumps(external_id) + b',"chosen_id":'
            for c in comps.values():
                answer_json, id_json = dumps(c.answer), dumps(c.external_id)
                c.answer = orjson.Fragment(answer_json)
                c.as_chosen = head + answer_json
                c.as_rejected = b',"rejected":' + answer_json + b',"margin":'
                c.chosen_id = ids + id_json
                c.rejected_id = b',"rejected_id":' + id_json
        return prompt


@dataclass(slots=True)
class AnnotationData:
    id: int
    prompt_id: int
    user_id: int
    ranking: list[list[int]]
    likert: dict[str, int]
    flags: dict[str, list[str]]
    rationale: str
    display_order: list[int]
    duration_ms: int | None
    strength: int | None
    both_bad: bool
    created_at: datetime
    annotator: str = ""
    """The annotator's pseudonym (``app.ranking.pseudonym``), filled in by the service."""


def _ext(prompt: PromptData, cid: int) -> str | None:
    c = prompt.completions.get(cid)
    return c.external_id if c is not None else None


@lru_cache(maxsize=1 << 16)
def _pair_plan(
    shape: tuple[int, ...], scores: tuple[int | None, ...], strength: int | None, ties: str
) -> tuple[tuple[int, int, float, bool], ...]:
    """:func:`app.ranking.expand_pairs` of a ranking written with positions instead of ids
    (``shape`` = its group sizes, ``scores`` = the Likert score at each position): the pairs
    as ``(chosen position, rejected position, margin, tie)``. Many annotations share a
    shape and scores, so this is computed once for each."""
    canonical: list[list[int]] = []
    n = 0
    for size in shape:
        canonical.append(list(range(n, n + size)))
        n += size
    likert = {str(i): v for i, v in enumerate(scores) if v is not None}
    pairs = expand_pairs(canonical, likert=likert, strength=strength, ties=ties)  # type: ignore[arg-type]
    return tuple((p.chosen, p.rejected, p.margin, p.tie) for p in pairs)


def _plan_of(
    ann: AnnotationData, ties: Literal["drop", "keep"]
) -> tuple[list[int], tuple[int | None, ...], tuple[tuple[int, int, float, bool], ...]]:
    ranking = ann.ranking
    flat = [cid for group in ranking for cid in group]
    likert = ann.likert
    scores = tuple(map(likert.get, map(str, flat))) if likert else ()
    return flat, scores, _pair_plan(tuple(map(len, ranking)), scores, ann.strength, ties)


def annotation_pairs(
    ann: AnnotationData, *, ties: Literal["drop", "keep"]
) -> list[tuple[int, int, float, bool]]:
    """``(chosen id, rejected id, margin, tie)`` for every pair of the annotation, exactly as
    :func:`app.ranking.expand_pairs` gives them, in the same order."""
    flat, _, plan = _plan_of(ann, ties)
    return [(flat[i], flat[j], margin, tie) for i, j, margin, tie in plan]


def pair_rows(
    ann: AnnotationData, prompt: PromptData, *, ties: Literal["drop", "keep"]
) -> Iterator[dict[str, Any]]:
    """One row per ordered comparison of one annotation (``app.ranking.expand_pairs``)."""
    comps = prompt.completions
    likert = ann.likert or {}
    pos = {cid: i for i, cid in enumerate(ann.display_order or ())}
    group = f"a{ann.id}"
    for chosen, rejected, margin, tie in annotation_pairs(ann, ties=ties):
        w, lo = comps.get(chosen), comps.get(rejected)
        if w is None or lo is None:  # not a completion of this prompt: never written so
            continue
        yield {
            "prompt": prompt.prompt,
            "chosen": w.answer,
            "rejected": lo.answer,
            "margin": margin,
            "tie": tie,
            "prompt_id": prompt.external_id,
            "chosen_id": w.external_id,
            "rejected_id": lo.external_id,
            "group_id": group,
            "annotator": ann.annotator,
            "annotation_id": ann.id,
            "likert_chosen": likert.get(str(w.id)),
            "likert_rejected": likert.get(str(lo.id)),
            "position_chosen": pos.get(w.id),
            "position_rejected": pos.get(lo.id),
            "created_at": ann.created_at,
        }


_MARGINS: dict[tuple[float, bool], bytes] = {}
_NUMBERS: dict[int | None, bytes] = {None: b"null", **{i: b"%d" % i for i in range(100)}}


def _number(value: int | None) -> bytes:
    encoded = _NUMBERS.get(value)
    return encoded if encoded is not None else b"%d" % value  # type: ignore[str-format]


def pair_lines(
    ann: AnnotationData, prompt: PromptData, *, ties: Literal["drop", "keep"]
) -> tuple[bytes, int]:
    """The JSON Lines of :func:`pair_rows` and their number: byte for byte what
    ``orjson.dumps(row, option=JSON_OPTIONS)`` writes for each row, assembled from pieces
    serialised once per prompt (``CompletionData.as_chosen`` …) and once per annotation —
    the export's hot path; a test holds the two equal. ``prompt`` must come from
    ``PromptData.build(..., fragments=True)``."""
    flat, scores, plan = _plan_of(ann, ties)
    comps = prompt.completions
    found = [comps.get(cid) for cid in flat]
    likert = [_number(v) for v in scores] if scores else [b"null"] * len(flat)
    shown = {cid: i for i, cid in enumerate(ann.display_order or ())}
    position = [_number(shown.get(cid)) for cid in flat]
    tail = b',"created_at":' + orjson.dumps(ann.created_at, option=orjson.OPT_UTC_Z) + b"}\n"
    # Per position in the ranking: the pieces that come after the chosen / rejected one.
    likert_rejected = [b',"likert_rejected":' + v + b',"position_chosen":' for v in likert]
    position_rejected = [b',"position_rejected":' + v + tail for v in position]
    mid = b',"group_id":"a%d","annotator":%b,"annotation_id":%d,"likert_chosen":' % (
        ann.id,
        orjson.dumps(ann.annotator),
        ann.id,
    )
    out: list[bytes] = []
    n = 0
    for i, j, margin, tie in plan:
        w, lo = found[i], found[j]
        if w is None or lo is None:  # not a completion of this prompt: never written so
            continue
        m = _MARGINS.get((margin, tie))
        if m is None:
            m = _MARGINS[(margin, tie)] = orjson.dumps(margin) + (
                b',"tie":true' if tie else b',"tie":false'
            )
        out += (
            w.as_chosen,
            lo.as_rejected,
            m,
            w.chosen_id,
            lo.rejected_id,
            mid,
            likert[i],
            likert_rejected[j],
            position[i],
            position_rejected[j],
        )
        n += 1
    return b"".join(out), n


def _keyed(prompt: PromptData, by_id: dict[str, Any]) -> dict[str, Any]:
    """A likert / flags object keyed by completion external ids (in completion order)."""
    out = {}
    for cid, c in prompt.completions.items():
        value = by_id.get(str(cid))
        if value is not None:
            out[c.external_id] = value
    return out


def _external_ranking(prompt: PromptData, ranking: list[list[int]]) -> list[list[str]]:
    groups = [[e for e in (_ext(prompt, cid) for cid in g) if e is not None] for g in ranking]
    return [g for g in groups if g]


def ranking_row(ann: AnnotationData, prompt: PromptData) -> dict[str, Any]:
    """One row per annotation, with the prompt's completions and ids as external ids."""
    return {
        "annotation_id": ann.id,
        "prompt": prompt.prompt,
        "prompt_id": prompt.external_id,
        "completions": prompt.completions_json,
        "ranking": _external_ranking(prompt, ann.ranking),
        "likert": _keyed(prompt, ann.likert or {}),
        "flags": _keyed(prompt, ann.flags or {}),
        "rationale": ann.rationale,
        "strength": ann.strength,
        "both_bad": ann.both_bad,
        "annotator": ann.annotator,
        "duration_ms": ann.duration_ms,
        "display_order": [e for e in (_ext(prompt, c) for c in ann.display_order) if e],
        "created_at": ann.created_at,
    }


def agreement(rankings: Sequence[list[list[int]]]) -> tuple[int, int]:
    """``(agreeing, compared)`` pooled over every pair of annotators of one prompt."""
    agree = compared = 0
    for i in range(len(rankings)):
        for j in range(i + 1, len(rankings)):
            a, c = pairwise_agreement(rankings[i], rankings[j])
            agree += a
            compared += c
    return agree, compared


def agreement_fraction(rankings: Sequence[list[list[int]]]) -> float | None:
    """Pooled pairwise agreement of a prompt's annotators, or None when nothing is comparable
    (a single annotator, or every shared pair tied by someone)."""
    agree, compared = agreement(rankings)
    return agree / compared if compared else None


def consensus_row(anns: Sequence[AnnotationData], prompt: PromptData) -> dict[str, Any]:
    """One row per prompt: the Bradley–Terry consensus of its annotators' rankings."""
    rankings = [a.ranking for a in anns]
    ranked = sorted({cid for r in rankings for g in r for cid in g if cid in prompt.completions})
    groups, scores = consensus_ranking(ranked, rankings)
    agree, compared = agreement(rankings)
    return {
        "prompt_id": prompt.external_id,
        "prompt": prompt.prompt,
        "completions": prompt.completions_json,
        "ranking": _external_ranking(prompt, groups),
        "scores": {
            prompt.completions[cid].external_id: round(scores[cid], SCORE_DIGITS) + 0.0
            for cid in ranked
        },
        "annotators": len(anns),
        "agreement": agree / compared if compared else None,
        "compared_pairs": compared,
        "annotation_ids": [a.id for a in anns],
    }


def hh_transcript(messages: Sequence[dict[str, str]], answer: str) -> str:
    """An Anthropic HH-RLHF transcript: ``\\n\\nHuman: …\\n\\nAssistant: …``, ending with
    ``answer``. System messages have no place in the format and are left out."""
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(HH_HUMAN + m["content"])
        elif m["role"] == "assistant":
            parts.append(HH_ASSISTANT + m["content"])
    parts.append(HH_ASSISTANT + answer)
    return "".join(parts)


def hh_rows(ann: AnnotationData, prompt: PromptData) -> Iterator[dict[str, Any]]:
    """One ``{"chosen", "rejected"}`` record per strict pair of the annotation."""
    comps = prompt.completions
    for pair in expand_pairs(ann.ranking, ties="drop"):
        w, lo = comps.get(pair.chosen), comps.get(pair.rejected)
        if w is None or lo is None:
            continue
        yield {
            "chosen": hh_transcript(prompt.messages, w.text),
            "rejected": hh_transcript(prompt.messages, lo.text),
        }
