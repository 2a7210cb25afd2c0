"""Reading preference data for the reward model: export files or URLs, HH-RLHF, splits, batches.

Every source becomes a list of :class:`Comparison` — one prompt, its K completions and the
ordered pairs (winner, loser, margin) a human judgement implies. A ``rankings`` export row is
one comparison of K completions; ``pairs`` export rows are regrouped by ``group_id`` (the C(K,2)
pairs of one ranking share it, so each completion is still scored once); an HH-RLHF row is a
K = 2 comparison. Tied pairs never enter the loss; their count is kept.

``reward_input_text`` is THE function that turns a prompt and a response into the text a reward
model scores (PPO uses it too, so it scores exactly as the reward model was trained);
``encode`` tokenises it with EOS appended and truncates from the left.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Messages = list[dict[str, str]]
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
KINDS = ("rankings", "pairs", "hh", "completions")


class DataError(ValueError):
    """Input the trainer cannot read; the message names the source and, when known, the row."""


@dataclass
class Comparison:
    """One batch element: a prompt, its completions and the strict pairs among them."""

    prompt: Messages
    completions: list[str]
    pairs: list[tuple[int, int, float]]
    """(winner index, loser index, margin ≥ 0) over ``completions``."""
    prompt_key: str
    annotator: str | None = None
    group: str = ""
    ranks: list[int] = field(default_factory=list)
    """Group index per completion (0 = best) when known; used by Kendall τ."""
    ties: int = 0
    """Tied pairs in the judgement (not in ``pairs``: they never enter the loss)."""

    @property
    def k(self) -> int:
        return len(self.completions)


@dataclass
class Dataset:
    """A source read into comparisons, with what was left out and why."""

    comparisons: list[Comparison]
    kind: str
    source: str
    rows: int = 0
    ties_dropped: int = 0
    no_strict_pair: int = 0
    """Judgements with no strict preference (all tied); kept out of training, counted."""


# --------------------------------------------------------------------------------------------
# Text the reward model scores


def reward_input_text(tokenizer, messages: Messages, response: str) -> str:
    """The text a reward model scores for ``response`` to the chat ``messages``.

    The tokenizer's chat template when it has one (the conversation plus the response as the
    assistant's turn), else an HH-style ``\\n\\nHuman: …\\n\\nAssistant: …`` transcript. EOS is
    appended at tokenisation (:func:`encode`), not here.
    """
    if getattr(tokenizer, "chat_template", None):
        conversation = [*messages, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return hh_transcript(messages) + f"{HH_ASSISTANT} {response}"


def hh_transcript(messages: Messages) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(
        f"\n\n{names.get(m.get('role', 'user'), str(m.get('role', 'user')).title())}: "
        f"{m.get('content', '')}"
        for m in messages
    )


def special_tokens(tokenizer) -> tuple[list[int], list[int], bool]:
    """(ids the tokenizer puts before a text, ids it puts after, whether EOS must be appended
    by us): BERT-like tokenizers wrap a text in [CLS] … [SEP]; causal LMs get EOS appended."""
    probe = "hello"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix: list[int] = []
    suffix: list[int] = []
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            prefix, suffix = full[:i], full[i + len(bare) :]
            break
    eos = tokenizer.eos_token_id
    append_eos = eos is not None and eos not in suffix
    return prefix, suffix, append_eos


def encode(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``text`` with the tokenizer's special tokens and EOS appended, at most
    ``max_length`` long: a longer text loses its beginning (the start of the prompt), never
    its end → ``(ids, truncated)``."""
    prefix, suffix, append_eos = special_tokens(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    budget = max_length - len(prefix) - len(suffix) - int(append_eos)
    if budget < 1:
        raise DataError(f"max_length {max_length} leaves no room for text")
    truncated = len(ids) > budget
    if truncated:
        ids = ids[-budget:]
    ids = prefix + ids + suffix
    if append_eos and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, truncated


# --------------------------------------------------------------------------------------------
# Reading sources


def read_rows(source: str, *, token: str | None = None) -> Iterator[dict]:
    """The JSON objects of a file (JSONL, gzip JSONL, JSON list, Parquet) or an export URL."""
    if source.startswith(("http://", "https://")):
        yield from _rows_from_bytes(_fetch(source, token=token), source)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    yield from _rows_from_bytes(path.read_bytes(), source)


def _fetch(url: str, *, token: str | None) -> bytes:
    token = token or os.environ.get("PREFERO_TOKEN")
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise DataError(f"{url}: HTTP {exc.code} {detail}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: {exc.reason}") from exc


def _rows_from_bytes(data: bytes, source: str) -> Iterator[dict]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        yield from pq.read_table(io.BytesIO(data)).to_pylist()
        return
    text = data.decode("utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: invalid JSON: {exc}") from exc
        yield from rows
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {number}: invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{source}: line {number}: expected a JSON object")
        yield row


def detect_kind(row: dict) -> str:
    if "completions" in row and "ranking" in row:
        return "rankings"
    if "chosen" in row and "rejected" in row:
        return "pairs" if "prompt" in row else "hh"
    if "prompt" in row and any(k in row for k in ("completion", "response", "text")):
        return "completions"
    raise DataError(
        "unknown row format: expected a rankings export row (completions, ranking), a pairs "
        "row (prompt, chosen, rejected), an HH-RLHF row (chosen, rejected) or a completion "
        f"row (prompt, completion); got keys {sorted(row)}"
    )


def load_source(source: str, *, token: str | None = None) -> Dataset:
    """Read any supported source into comparisons (format detected from the first row)."""
    rows = list(read_rows(source, token=token))
    if not rows:
        raise DataError(f"{source}: no rows")
    kind = detect_kind(rows[0])
    if kind == "completions":
        raise DataError(f"{source}: completion rows carry no preference; use `score` on them")
    builder = {"rankings": comparisons_from_rankings, "pairs": comparisons_from_pairs}.get(
        kind, comparisons_from_hh
    )
    dataset = builder(rows)
    dataset.source = source
    return dataset


def as_messages(prompt) -> Messages:
    """An export ``prompt`` (a string or a message list) → a message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return [
            {"role": str(m.get("role", "user")), "content": str(m.get("content", ""))}
            for m in prompt
        ]
    raise DataError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")


def as_text(completion) -> str:
    """A completion (a string or ``[{"role": "assistant", "content": …}]``) → its text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content", completion.get("text", "")))
    raise DataError(f"completion must be text or messages, got {type(completion).__name__}")


def prompt_key_of(row: dict, messages: Messages) -> str:
    """The key that splits by prompt (reward-model evaluation and PPO's held-out prompts): the
    export's ``prompt_id`` when the row has one, else the prompt's messages."""
    if row.get("prompt_id") is not None:
        return f"id:{row['prompt_id']}"
    return "text:" + json.dumps(messages, sort_keys=True, ensure_ascii=False)


def ranking_margin(
    winner: str, loser: str, likert: dict | None, strength: int | None, k: int
) -> float:
    """The margin of a strict pair of a rankings row, as the export defines it (strength for
    K = 2, else the Likert difference floored at 0, else 1)."""
    if strength is not None and k == 2:
        return float(strength)
    if likert:
        w, lo = likert.get(str(winner)), likert.get(str(loser))
        if w is not None and lo is not None:
            return float(max(w - lo, 0))
    return 1.0


def comparisons_from_rankings(rows: Iterable[dict]) -> Dataset:
    out: list[Comparison] = []
    ties = no_pair = count = 0
    for number, row in enumerate(rows, start=1):
        count += 1
        try:
            messages = as_messages(row["prompt"])
            completions = {str(c["id"]): as_text(c.get("text", "")) for c in row["completions"]}
            groups = [[str(cid) for cid in group] for group in row["ranking"]]
        except (KeyError, TypeError) as exc:
            raise DataError(f"rankings row {number}: missing or malformed {exc}") from exc
        order = [cid for group in groups for cid in group]
        unknown = [cid for cid in order if cid not in completions]
        if unknown:
            raise DataError(f"rankings row {number}: ranking names unknown completions {unknown}")
        index = {cid: i for i, cid in enumerate(order)}
        ranks = [g for g, group in enumerate(groups) for _ in group]
        likert = row.get("likert") or None
        pairs = []
        for gi, better in enumerate(groups):
            ties += len(better) * (len(better) - 1) // 2
            for worse in groups[gi + 1 :]:
                for w in better:
                    for lo in worse:
                        margin = ranking_margin(w, lo, likert, row.get("strength"), len(order))
                        pairs.append((index[w], index[lo], margin))
        if not pairs:
            no_pair += 1
            continue
        out.append(
            Comparison(
                prompt=messages,
                completions=[completions[cid] for cid in order],
                pairs=pairs,
                prompt_key=prompt_key_of(row, messages),
                annotator=_opt_str(row.get("annotator")),
                group=str(row.get("annotation_id", number)),
                ranks=ranks,
                ties=sum(len(g) * (len(g) - 1) // 2 for g in groups),
            )
        )
    return Dataset(out, "rankings", "", rows=count, ties_dropped=ties, no_strict_pair=no_pair)


def is_tie_row(row: dict) -> bool:
    """A ``pairs`` row from a tie (exported with ``ties=keep``): an explicit ``tie`` flag, or
    margin 0 with both completions at the same rank."""
    if row.get("tie") is not None:
        return bool(row["tie"])
    margin = float(row.get("margin") or 0.0)
    rank_w, rank_l = row.get("rank_chosen"), row.get("rank_rejected")
    return margin == 0 and rank_w is not None and rank_w == rank_l


def comparisons_from_pairs(rows: Iterable[dict]) -> Dataset:
    groups: dict[str, Comparison] = {}
    ids: dict[str, dict[str, int]] = {}
    ties = count = 0
    for number, row in enumerate(rows, start=1):
        count += 1
        try:
            messages = as_messages(row["prompt"])
            chosen, rejected = as_text(row["chosen"]), as_text(row["rejected"])
        except KeyError as exc:
            raise DataError(f"pairs row {number}: missing {exc}") from exc
        margin = float(row.get("margin") or 0.0)
        if margin < 0:
            raise DataError(f"pairs row {number}: margin must be ≥ 0, got {margin}")
        key = str(row["group_id"]) if row.get("group_id") is not None else f"row:{number}"
        comparison = groups.get(key)
        if comparison is None:
            comparison = groups[key] = Comparison(
                prompt=messages,
                completions=[],
                pairs=[],
                prompt_key=prompt_key_of(row, messages),
                annotator=_opt_str(row.get("annotator")),
                group=key,
            )
            ids[key] = {}
        slots = ids[key]
        indices = []
        for cid, text in ((row.get("chosen_id"), chosen), (row.get("rejected_id"), rejected)):
            slot = f"id:{cid}" if cid is not None else f"text:{text}"
            if slot not in slots:
                slots[slot] = len(comparison.completions)
                comparison.completions.append(text)
            indices.append(slots[slot])
        if is_tie_row(row):
            comparison.ties += 1
            ties += 1
            continue
        comparison.pairs.append((indices[0], indices[1], margin))
    out = [c for c in groups.values() if c.pairs]
    return Dataset(
        out, "pairs", "", rows=count, ties_dropped=ties, no_strict_pair=len(groups) - len(out)
    )


def split_hh(transcript: str) -> tuple[Messages, str]:
    """An HH-RLHF transcript → (prompt messages, final assistant response)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError("HH-RLHF transcript without an '\\n\\nAssistant:' turn")
    prompt, response = transcript[:cut], transcript[cut + len(HH_ASSISTANT) :]
    messages: Messages = []
    rest = prompt
    while rest:
        h, a = rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)
        starts = [(i, tag) for i, tag in ((h, HH_HUMAN), (a, HH_ASSISTANT)) if i >= 0]
        if not starts:
            if messages:
                messages[-1]["content"] += rest
            elif rest.strip():
                messages.append({"role": "user", "content": rest.strip()})
            break
        i, tag = min(starts)
        if i > 0 and messages:
            messages[-1]["content"] += rest[:i]
        role = "user" if tag == HH_HUMAN else "assistant"
        messages.append({"role": role, "content": ""})
        rest = rest[i + len(tag) :]
        nxt = [j for j in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if j >= 0]
        end = min(nxt) if nxt else len(rest)
        messages[-1]["content"] = rest[:end].strip()
        rest = rest[end:]
    return messages, response.strip()


def comparisons_from_hh(rows: Iterable[dict]) -> Dataset:
    out = []
    count = 0
    for number, row in enumerate(rows, start=1):
        count += 1
        try:
            prompt_w, chosen = split_hh(row["chosen"])
            _, rejected = split_hh(row["rejected"])
        except (KeyError, DataError) as exc:
            raise DataError(f"HH-RLHF row {number}: {exc}") from exc
        messages = prompt_w  # the two transcripts differ only in the last assistant turn
        out.append(
            Comparison(
                prompt=messages,
                completions=[chosen, rejected],
                pairs=[(0, 1, 1.0)],
                prompt_key="text:" + json.dumps(messages, sort_keys=True, ensure_ascii=False),
                group=f"row:{number}",
                ranks=[0, 1],
            )
        )
    return Dataset(out, "hh", "", rows=count)


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Splits


def hash_fraction(key: str, *, seed: int) -> float:
    """A stable uniform draw in [0, 1) for ``key`` (the service's ``split_of`` formula)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class Split:
    train: list[Comparison]
    test: list[Comparison]
    """Held-out prompts, annotators seen in training."""
    test_annotators: list[Comparison]
    """Held-out prompts by held-out annotators (InstructGPT's held-out-labeler test)."""
    heldout_annotators: list[str]
    unused: int = 0
    """Training-prompt judgements by held-out annotators (kept out of both sides)."""


def split_comparisons(
    comparisons: Sequence[Comparison],
    *,
    eval_fraction: float,
    seed: int = 0,
    test_size: int | None = None,
    min_annotators: int = 3,
) -> Split:
    """Split by prompt (every comparison of one prompt lands on one side) and, with at least
    ``min_annotators`` annotators, also hold out a fraction of them (at least one).

    ``test_size`` asks for an exact number of test comparisons instead of a fraction: prompts
    are taken in hash order until it is reached.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError("eval fraction must be in [0, 1)")
    annotators = sorted({c.annotator for c in comparisons if c.annotator is not None})
    held: set[str] = set()
    if eval_fraction > 0 and len(annotators) >= min_annotators:
        ranked = sorted(annotators, key=lambda a: hash_fraction("annotator:" + a, seed=seed))
        n_held = max(1, min(len(annotators) - 1, round(eval_fraction * len(annotators))))
        held = set(ranked[:n_held])
    if test_size is not None:
        keys = sorted(
            {c.prompt_key for c in comparisons}, key=lambda k: hash_fraction(k, seed=seed)
        )
        per_key: dict[str, int] = {}
        for c in comparisons:
            per_key[c.prompt_key] = per_key.get(c.prompt_key, 0) + 1
        test_keys: set[str] = set()
        total = 0
        for key in keys:
            if total >= test_size:
                break
            test_keys.add(key)
            total += per_key[key]
    else:
        test_keys = {
            c.prompt_key
            for c in comparisons
            if hash_fraction(c.prompt_key, seed=seed) < eval_fraction
        }
    split = Split([], [], [], sorted(held))
    for c in comparisons:
        in_test = c.prompt_key in test_keys
        by_held = c.annotator in held
        if in_test:
            (split.test_annotators if by_held else split.test).append(c)
        elif by_held:
            split.unused += 1
        else:
            split.train.append(c)
    return split


# --------------------------------------------------------------------------------------------
# Tokenised comparisons and batches


@dataclass
class Encoded:
    """A comparison's completions as token ids (prompt + completion + EOS each)."""

    comparison: Comparison
    rows: list[list[int]]
    truncated: bool

    @property
    def length(self) -> int:
        return max(len(r) for r in self.rows)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def encode_comparisons(
    tokenizer, comparisons: Sequence[Comparison], max_length: int
) -> list[Encoded]:
    out = []
    for c in comparisons:
        rows, truncated = [], False
        for text in c.completions:
            ids, cut = encode(tokenizer, reward_input_text(tokenizer, c.prompt, text), max_length)
            rows.append(ids)
            truncated |= cut
        out.append(Encoded(c, rows, truncated))
    return out


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    group: bool = True,
    mega: int = 64,
) -> list[list[int]]:
    """Indices in batches of ``batch_size``: shuffled, then (with ``group``) sorted by length
    inside mega-batches of ``mega`` batches so a batch holds similar lengths; the batch order
    is shuffled again so long and short batches alternate (HF's LengthGroupedSampler idea)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(encoded: Sequence[Encoded], pad_id: int, *, margin_scale: float = 0.0):
    """Right-padded tensors for a list of comparisons: every completion is one row.

    Returns ``input_ids`` and ``attention_mask`` (R × T, R = Σ K), ``winners``/``losers``
    (row indices of each strict pair), ``margins`` (scaled) and ``owner`` (the comparison
    index of each pair, for the per-ranking mean).
    """
    import torch

    rows = [ids for e in encoded for ids in e.rows]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    winners, losers, margins, owner = [], [], [], []
    offset = 0
    for j, e in enumerate(encoded):
        for w, lo, m in e.comparison.pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            margins.append(m * margin_scale)
            owner.append(j)
        offset += len(e.rows)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "winners": torch.tensor(winners, dtype=torch.long),
        "losers": torch.tensor(losers, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "owner": torch.tensor(owner, dtype=torch.long),
        "n": len(encoded),
    }
