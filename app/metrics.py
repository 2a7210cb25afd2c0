"""Quality metrics of a project's annotations: agreement, biases, model strengths (pure numpy,
no database). Definitions, formulas and the outlier rule are documented in ``docs/metrics.md``.

The input is a :class:`RankTable`: the current submitted annotations as arrays, one row per
annotation and one column per *slot* (a completion of the prompt; slot 0 is the prompt's
completion with the smallest id among those ranked). ``pos[a, s]`` is the mid-rank of slot
``s`` in annotation ``a`` (1 = best; tied completions share the mean of their places: ``[[x],
[y, z]]`` gives x 1, y 2.5, z 2.5) and NaN where the annotation did not rank that completion.

Everything is vectorised over annotations: the only Python loops run over the K(K−1)/2 slot
pairs, the annotators, the models and the rankings' groups (once, to build the table), so a
quarter of a million annotations take well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from app.ranking import Ranking

RESAMPLES = 1000
"""Bootstrap resamples for every interval."""
SEED = 20261130
"""The bootstrap's seed: the same data give the same intervals."""
MAX_GROUPS = 2000
"""Above this many distinct prompt rows, the bootstrap resamples random blocks of prompts."""
OUTLIER_MADS = 2.0
"""An annotator's consensus agreement this many (scaled) MADs below the median is an outlier."""
MAD_FLOOR = 0.05
"""The spread used by the outlier rule is at least this (5 percentage points of agreement)."""
MIN_PAIRS = 30
"""Consensus pairs an annotator needs before the agreement rule can flag them."""
MIN_ANNOTATORS = 3
"""Annotators with enough pairs the agreement rule needs (a median of two is no reference)."""
BIAS_P = 0.01
"""A two-sided binomial p-value below this on the first-shown wins flags a position bias."""
LIKERT_VALUES = tuple(range(1, 8))


@dataclass(frozen=True, slots=True)
class RankTable:
    prompt: np.ndarray
    """(A,) prompt index of each annotation, 0 … n_prompts − 1."""
    annotator: np.ndarray
    """(A,) annotator index of each annotation, 0 … n_annotators − 1."""
    pos: np.ndarray
    """(A, K) mid-rank of each slot, 1 = best; NaN = not ranked."""
    top: np.ndarray
    """(A, K) the slot is in the annotation's best group."""
    first: np.ndarray
    """(A,) the slot shown first (display_order[0]); −1 when unknown."""
    slot_ids: np.ndarray
    """(P, K) the completion id in each slot of each prompt; −1 = none."""
    prompt_keys: np.ndarray
    """(P,) the prompts' ids, ascending."""
    annotator_keys: np.ndarray
    """(U,) the annotators' ids, ascending."""
    cids: np.ndarray
    """Every ranked completion id, ascending …"""
    cid_slot: np.ndarray
    """… and its slot."""

    @property
    def n(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def k(self) -> int:
        return int(self.pos.shape[1])

    @property
    def n_prompts(self) -> int:
        return int(self.prompt_keys.shape[0])

    @property
    def n_annotators(self) -> int:
        return int(self.annotator_keys.shape[0])

    def slots_of(self, cids: np.ndarray) -> np.ndarray:
        """The slot of each completion id (−1 for one no annotation ranked)."""
        cids = np.asarray(cids, dtype=np.int64)
        if self.cids.size == 0:
            return np.full(cids.shape, -1, dtype=np.int64)
        at = index_of(self.cids, cids)
        return np.where(at >= 0, self.cid_slot[at], -1)

    def per_slot(self, cids: Sequence[int], values: np.ndarray, fill: float) -> np.ndarray:
        """(P, K) matrix of a completion attribute (length, model index) by slot."""
        out = np.full(self.slot_ids.shape, fill, dtype=np.asarray(values).dtype)
        cids = np.asarray(cids, dtype=np.int64)
        if cids.size == 0 or self.cids.size == 0:
            return out
        flat = out.ravel()
        at = index_of(cids, self.slot_ids.ravel())  # empty slots (−1) are no id: not found
        hit = at >= 0
        flat[hit] = np.asarray(values)[at[hit]]
        return flat.reshape(out.shape)


def encode_rankings(
    prompt_ids: Sequence[int] | np.ndarray,
    annotator_ids: Sequence[int] | np.ndarray,
    rankings: Sequence[Ranking],
    display_orders: Sequence[Sequence[int]] | None = None,
) -> RankTable:
    """Build the :class:`RankTable` of submitted annotations (one ranking each)."""
    n = len(rankings)
    groups_per = np.fromiter((len(r) for r in rankings), dtype=np.int64, count=n)
    sizes = np.fromiter((len(g) for r in rankings for g in r), dtype=np.int64)
    ids = np.fromiter(chain.from_iterable(chain.from_iterable(rankings)), dtype=np.int64)
    owner = np.repeat(np.repeat(np.arange(n), groups_per), sizes)
    group_key = np.repeat(np.arange(sizes.size), sizes)
    first = None
    if display_orders is not None:
        first = np.fromiter((d[0] if d else -1 for d in display_orders), np.int64, count=n)
    return _encode(
        prompt_ids, annotator_ids, n, owner=owner, ids=ids, group_key=group_key, first_shown=first
    )


def _dense(lo: int, hi: int, n: int) -> bool:
    """Ids from ``lo`` to ``hi``, ``n`` of them, are dense enough for a table over the range."""
    return hi - lo <= 4 * n + 4096


def index_of(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query, its position in ``keys`` (distinct integer ids, any order), −1 when
    absent: a table over the id range when the keys are dense, else a sort and binary search."""
    keys = np.asarray(keys, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    out = np.full(queries.shape, -1, dtype=np.int64)
    if keys.size == 0:
        return out
    lo, hi = int(keys.min()), int(keys.max())
    if _dense(lo, hi, keys.size):
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[keys - lo] = np.arange(keys.size)
        inside = (queries >= lo) & (queries <= hi)
        out[inside] = table[queries[inside] - lo]
        return out
    order = np.argsort(keys)
    at = np.clip(np.searchsorted(keys[order], queries), 0, keys.size - 1)
    return np.where(keys[order][at] == queries, order[at], -1)


def unique_ids(
    values: Sequence[int] | np.ndarray, *, first_index: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``np.unique(values, return_inverse=True[, return_index=True])`` for integer ids: the
    distinct values ascending, each value's position among them and, with ``first_index``,
    where each distinct value first occurs. Ids are dense (a range not much wider than their
    count), so a presence table over the range does it in linear time; ``np.unique`` sorts
    (the largest single cost of the statistics, which call it on millions of ids)."""
    a = np.asarray(values, dtype=np.int64).reshape(-1)
    if a.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty if first_index else None
    lo, hi = int(a.min()), int(a.max())
    if not _dense(lo, hi, a.size):
        if first_index:
            keys, index, inverse = np.unique(a, return_index=True, return_inverse=True)
            return keys, inverse.reshape(-1), index
        keys, inverse = np.unique(a, return_inverse=True)
        return keys, inverse.reshape(-1), None
    offset = a - lo
    present = np.zeros(hi - lo + 1, dtype=bool)
    present[offset] = True
    keys = np.flatnonzero(present) + lo
    rank = np.cumsum(present, dtype=np.int64) - 1
    inverse = rank[offset]
    index = None
    if first_index:
        first = np.empty(hi - lo + 1, dtype=np.int64)
        first[offset[::-1]] = np.arange(a.size - 1, -1, -1)  # the last write (first seen) wins
        index = first[keys - lo]
    return keys, inverse, index


def _encode(
    prompt_ids: Sequence[int] | np.ndarray,
    annotator_ids: Sequence[int] | np.ndarray,
    n: int,
    *,
    owner: np.ndarray,
    ids: np.ndarray,
    group_key: np.ndarray,
    first_shown: Sequence[int | None] | np.ndarray | None,
) -> RankTable:
    """The table from flat arrays: completion ``ids[i]`` is ranked by annotation ``owner[i]``
    in the group ``group_key[i]`` (equal keys = one group; both arrays in ranking order)."""
    prompt_keys, p_idx, _ = unique_ids(prompt_ids)
    annotator_keys, u_idx, _ = unique_ids(annotator_ids)
    m = ids.size
    index = np.arange(m)
    new_group = np.ones(m, dtype=bool)
    new_group[1:] = group_key[1:] != group_key[:-1]
    new_row = np.ones(m, dtype=bool)
    new_row[1:] = owner[1:] != owner[:-1]
    new_group |= new_row
    group_first = np.maximum.accumulate(np.where(new_group, index, 0)) if m else index
    row_first = np.maximum.accumulate(np.where(new_row, index, 0)) if m else index
    group_id = np.cumsum(new_group) - 1
    size = np.bincount(group_id)[group_id] if m else index
    mid = (group_first - row_first) + (size + 1) / 2.0
    is_top = group_first == row_first
    # Slots: each prompt's ranked completion ids in ascending order.
    cids, cid_of, first_at = unique_ids(ids, first_index=True)
    assert first_at is not None
    cid_prompt = p_idx[owner[first_at]] if cids.size else np.zeros(0, np.int64)
    order = np.lexsort((cids, cid_prompt))
    by_prompt = cid_prompt[order]
    starts = np.searchsorted(by_prompt, by_prompt, side="left")
    cid_slot = np.empty(cids.size, dtype=np.int64)
    cid_slot[order] = np.arange(cids.size) - starts
    k = int(cid_slot.max()) + 1 if cids.size else 0
    slot = cid_slot[cid_of] if m else ids
    pos = np.full((n, k), np.nan)
    top = np.zeros((n, k), dtype=bool)
    pos[owner, slot] = mid
    top[owner, slot] = is_top
    slot_ids = np.full((prompt_keys.size, k), -1, dtype=np.int64)
    slot_ids[cid_prompt, cid_slot] = cids
    table = RankTable(
        prompt=p_idx.astype(np.int64).reshape(-1),
        annotator=u_idx.astype(np.int64).reshape(-1),
        pos=pos,
        top=top,
        first=np.full(n, -1, dtype=np.int64),
        slot_ids=slot_ids,
        prompt_keys=prompt_keys,
        annotator_keys=annotator_keys,
        cids=cids,
        cid_slot=cid_slot,
    )
    if first_shown is not None:
        first = np.asarray(
            [-1 if f is None else f for f in first_shown]
            if not isinstance(first_shown, np.ndarray)
            else first_shown,
            dtype=np.int64,
        )
        table.first[:] = np.where(first >= 0, table.slots_of(first), -1)
    return table


@dataclass(frozen=True, slots=True)
class IntLists:
    """The integers of many small JSON texts, flattened: ``row[i]`` is the text the i-th
    integer came from, ``bracket[i]`` how many ``[`` precede it in that text."""

    row: np.ndarray
    value: np.ndarray
    bracket: np.ndarray

    def take(self, rows: np.ndarray, n_texts: int) -> IntLists:
        """Only the integers of texts ``rows`` (ascending), renumbered 0 … len(rows) − 1."""
        new = np.full(n_texts, -1, dtype=np.int64)
        new[rows] = np.arange(len(rows))
        mapped = new[self.row]
        keep = mapped >= 0
        return IntLists(mapped[keep], self.value[keep], self.bracket[keep])


_SEP = ";"
_DELETE_ALLOWED = str.maketrans("", "", '0123456789[]{}",: ;')
_TO_SPACE = str.maketrans(']{}",:', "      ")
_INT64_MAX = np.iinfo(np.int64).max


def parse_int_json(texts: Sequence[str | None]) -> IntLists | None:
    """Read every integer out of JSON texts made only of non-negative integers (and of
    strings of digits: ``{"12": 5}``) in a few numpy passes over their bytes, instead of
    building millions of Python lists. None when a text holds anything else (the caller then
    parses with a JSON library)."""
    return parse_int_text(_SEP.join(t or "" for t in texts))


def parse_int_text(joined: str | None) -> IntLists | None:
    """:func:`parse_int_json` of texts already joined by ``;`` (as a database aggregates
    them).

    The text becomes a stream of numbers that numpy's C reader takes in one pass: every ``[``
    turns into the marker −1, every ``;`` (the end of a text) into −2, every other
    non-digit into a space; running counts of the markers then give each integer its text and
    its brackets. Only str methods and whole-array numpy operations touch the data."""
    joined = joined or ""
    if not joined.isascii() or joined.translate(_DELETE_ALLOWED):
        return None  # something besides integers, brackets, braces and quoted digits
    stream = joined.replace("[", " -1 ").replace(_SEP, " -2 ").translate(_TO_SPACE)
    if stream.isspace() or not stream:  # numpy would read one 0 out of blanks alone
        return IntLists(*(np.zeros(0, np.int64) for _ in range(3)))
    tokens = np.fromstring(stream, dtype=np.int64, sep=" ")  # text mode: C parser
    del stream
    opens, seps, is_int = tokens == -1, tokens == -2, tokens >= 0
    if int(opens.sum()) != joined.count("[") or int(seps.sum()) != joined.count(_SEP):
        return None  # the reader stopped early
    value = tokens[is_int]
    del tokens
    if value.size and value.max() == _INT64_MAX:
        return None  # saturated: beyond int64
    # Running counts in int32 (half the memory traffic of int64 on millions of tokens).
    seps_before = np.cumsum(seps, dtype=np.int32)
    opens_before = np.cumsum(opens, dtype=np.int32)
    row = seps_before[is_int]
    at_text_start = np.concatenate((np.zeros(1, np.int32), opens_before[seps]))
    bracket = opens_before[is_int] - at_text_start[row]
    return IntLists(row.astype(np.int64), value, bracket.astype(np.int64))


def encode_ranking_texts(
    prompt_ids: Sequence[int] | np.ndarray,
    annotator_ids: Sequence[int] | np.ndarray,
    ranking_texts: Sequence[str | None],
    first_shown: Sequence[int | None] | np.ndarray | None = None,
) -> RankTable | None:
    """:func:`encode_rankings` from the rankings' JSON texts (``[[3], [1, 4], [2]]``), parsed by
    :func:`parse_int_json`; None when a text is not a ranking of integer ids."""
    parsed = parse_int_json(ranking_texts)
    if parsed is None:
        return None
    return encode_ranking_lists(
        prompt_ids, annotator_ids, parsed, len(ranking_texts), first_shown=first_shown
    )


def encode_ranking_lists(
    prompt_ids: Sequence[int] | np.ndarray,
    annotator_ids: Sequence[int] | np.ndarray,
    parsed: IntLists,
    n: int,
    *,
    first_shown: Sequence[int | None] | np.ndarray | None = None,
) -> RankTable | None:
    """:func:`encode_rankings` from rankings parsed by :func:`parse_int_json` (``n`` texts);
    None when they are not lists of lists of ids."""
    # Inside a ranking text the k-th group is opened by its (k + 2)-th '['.
    group_key = parsed.row * 1_000_003 + parsed.bracket  # unique per (text, group)
    if parsed.value.size and (np.any(parsed.bracket < 2) or np.any(np.diff(group_key) < 0)):
        return None
    return _encode(
        prompt_ids,
        annotator_ids,
        n,
        owner=parsed.row,
        ids=parsed.value,
        group_key=group_key,
        first_shown=first_shown,
    )


def pair_signs(table: RankTable) -> Iterator[tuple[int, int, np.ndarray]]:
    """For each slot pair i < j: (A,) +1 where the annotation ranks i above j, −1 below, 0 for a
    tie or when it did not rank both."""
    for i in range(table.k):
        for j in range(i + 1, table.k):
            diff = table.pos[:, j] - table.pos[:, i]
            yield i, j, np.sign(np.nan_to_num(diff, nan=0.0)).astype(np.int8)


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True, slots=True)
class Agreement:
    prompt_agree: np.ndarray
    """(P,) pairs of annotators × completion pairs both ranked strictly, in the same order."""
    prompt_compared: np.ndarray
    """(P,) pairs of annotators × completion pairs both ranked strictly."""
    others_agree: np.ndarray
    """(A,) how many (other annotator, completion pair) agree with this annotation."""
    others_compared: np.ndarray
    consensus_agree: np.ndarray
    """(A,) completion pairs this annotation orders like the majority of the others."""
    consensus_compared: np.ndarray
    """(A,) completion pairs it ranks strictly where the others' majority is not split."""

    @property
    def rate(self) -> float | None:
        return ratio(self.prompt_agree.sum(), self.prompt_compared.sum())


def agreement(table: RankTable) -> Agreement:
    """Pairwise inter-annotator agreement (InstructGPT's), per prompt, and each annotation's
    agreement with the other annotators of its prompt: pooled over them, and with their
    pairwise majority (the leave-one-out consensus)."""
    n_p, a = table.n_prompts, table.n
    p = table.prompt
    prompt_agree = np.zeros(n_p)
    prompt_compared = np.zeros(n_p)
    others_agree = np.zeros(a)
    others_compared = np.zeros(a)
    cons_agree = np.zeros(a)
    cons_compared = np.zeros(a)
    for _, _, d in pair_signs(table):
        up, down = d > 0, d < 0
        plus = np.bincount(p, weights=up, minlength=n_p)
        minus = np.bincount(p, weights=down, minlength=n_p)
        prompt_agree += plus * (plus - 1) / 2 + minus * (minus - 1) / 2
        both = plus + minus
        prompt_compared += both * (both - 1) / 2
        o_plus = plus[p] - up
        o_minus = minus[p] - down
        others_agree += np.where(up, o_plus, 0.0) + np.where(down, o_minus, 0.0)
        others_compared += np.where(d != 0, o_plus + o_minus, 0.0)
        majority = np.sign(o_plus - o_minus)
        decided = (d != 0) & (majority != 0)
        cons_compared += decided
        cons_agree += decided & (majority == d)
    return Agreement(
        prompt_agree, prompt_compared, others_agree, others_compared, cons_agree, cons_compared
    )


def ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def rank_alpha(table: RankTable) -> float | None:
    """Krippendorff's alpha (ordinal) of the rankings: units = (prompt, completion), coders =
    annotators, value = mid-rank position. None when no unit has two values or every value is
    the same."""
    if table.n == 0 or table.k == 0:
        return None
    codes = np.rint(2 * table.pos - 2)  # mid-ranks 1, 1.5, 2, … → 0, 1, 2, …
    domain = np.arange(2 * table.k - 1, dtype=np.float64) / 2 + 1
    return _alpha(table, codes, domain, "ordinal")


def _alpha(table: RankTable, codes: np.ndarray, domain: np.ndarray, level: str) -> float | None:
    rows, slots = np.nonzero(~np.isnan(codes))
    if rows.size == 0:
        return None
    v = domain.size
    unit = table.prompt[rows] * table.k + slots
    counts = np.bincount(
        unit * v + codes[rows, slots].astype(np.int64), minlength=table.n_prompts * table.k * v
    ).reshape(-1, v)
    return krippendorff_alpha(counts, domain, level)


def krippendorff_alpha(counts: np.ndarray, domain: np.ndarray, level: str) -> float | None:
    """Krippendorff's alpha from value counts (units × values), as ``krippendorff.alpha(
    value_counts=…, value_domain=…, level_of_measurement=…)`` computes it (the tests hold the
    two equal) but in O(units · V): the package builds a units × V × V array, 100 MB and a
    second for a quarter of a million units. Levels: nominal, ordinal, interval.

    alpha = 1 − (n − 1) Σ o_vw δ_vw / Σ n_v n_w δ_vw, with the coincidences o_vw = Σ_u (c_uv c_uw
    − [v = w] c_uv) / (m_u − 1) over units with m_u ≥ 2 values, n_v = Σ_w o_vw, n = Σ n_v.
    None when no unit is pairable or only one value occurs."""
    counts = np.asarray(counts, dtype=np.float64)
    domain = np.asarray(domain, dtype=np.float64)
    m = counts.sum(1)
    counts = counts[m >= 2]
    m = m[m >= 2]
    if counts.shape[0] == 0:
        return None
    weighted = counts / (m - 1)[:, None]
    o = weighted.T @ counts - np.diag(weighted.sum(0))
    n_v = o.sum(1)
    n = n_v.sum()
    if (n_v > 0).sum() < 2:
        return None
    if level == "nominal":
        delta = 1.0 - np.eye(domain.size)
    elif level == "interval":
        delta = (domain[:, None] - domain[None, :]) ** 2
    elif level == "ordinal":
        cum = np.concatenate(([0.0], np.cumsum(n_v)))
        i, j = np.meshgrid(np.arange(domain.size), np.arange(domain.size), indexing="ij")
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        between = cum[hi + 1] - cum[lo]
        delta = (between - (n_v[i] + n_v[j]) / 2) ** 2
    else:
        raise ValueError(f"unknown level of measurement {level!r}")
    expected = (np.outer(n_v, n_v) * delta).sum()
    if expected == 0:
        return None
    return float(1.0 - (n - 1) * (o * delta).sum() / expected)


@dataclass(frozen=True, slots=True)
class LikertAgreement:
    alpha: float | None
    """Krippendorff's alpha (interval) of the 1–7 scores; units = (prompt, completion)."""
    pairs: int
    """Pairs of annotators who scored the same completion."""
    exact: float | None
    """Share of those pairs giving the same score …"""
    within_one: float | None
    """… and scores at most one point apart."""


def likert_agreement(table: RankTable, scores: np.ndarray) -> LikertAgreement:
    """``scores``: (A, K) Likert score of each slot (NaN = none)."""
    if table.n == 0 or table.k == 0:
        return LikertAgreement(None, 0, None, None)
    valid = np.isin(scores, LIKERT_VALUES)
    codes = np.where(valid, scores - 1, np.nan)
    domain = np.asarray(LIKERT_VALUES, dtype=np.float64)
    alpha = _alpha(table, codes, domain, "interval")
    rows, slots = np.nonzero(valid)
    v = domain.size
    unit = table.prompt[rows] * table.k + slots
    counts = np.bincount(
        unit * v + codes[rows, slots].astype(np.int64), minlength=table.n_prompts * table.k * v
    ).reshape(-1, v)
    counts = counts.astype(np.float64)
    n = counts.sum(1)
    pairs = float((n * (n - 1) / 2).sum())
    same = float((counts * (counts - 1) / 2).sum())
    adjacent = float((counts[:, :-1] * counts[:, 1:]).sum())
    return LikertAgreement(alpha, int(pairs), ratio(same, pairs), ratio(same + adjacent, pairs))


# --------------------------------------------------------------------------- biases


@dataclass(frozen=True, slots=True)
class PositionBias:
    won: np.ndarray
    """(A,) the first-shown completion is in the annotation's best group."""
    expected: np.ndarray
    """(A,) the chance of that without any bias: |best group| / completions ranked."""
    known: np.ndarray
    """(A,) the first-shown completion is known (display_order recorded)."""


def position_bias(table: RankTable) -> PositionBias:
    known = table.first >= 0
    rows = np.arange(table.n)
    won = np.zeros(table.n, dtype=bool)
    if table.k:
        won[known] = table.top[rows[known], table.first[known]]
    ranked = (~np.isnan(table.pos)).sum(1)
    expected = np.divide(table.top.sum(1), ranked, out=np.zeros(table.n), where=ranked > 0)
    return PositionBias(won, expected, known)


def length_bias(table: RankTable, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per annotation: (strict pairs of completions of different lengths where the longer one
    was ranked higher, such pairs). ``lengths``: (P, K) characters per slot (NaN = unknown)."""
    longer_won = np.zeros(table.n)
    pairs = np.zeros(table.n)
    for i, j, d in pair_signs(table):
        li, lj = lengths[table.prompt, i], lengths[table.prompt, j]
        differ = (d != 0) & (li != lj) & ~np.isnan(li) & ~np.isnan(lj)
        pairs += differ
        longer_won += differ & ((d > 0) == (li > lj))
    return longer_won, pairs


def binomial_p(k: int, n: int, p: float) -> float:
    """Two-sided exact binomial test: the probability, under Binomial(n, p), of an outcome no
    more likely than ``k`` (the convention of R's ``binom.test``)."""
    if n <= 0:
        return 1.0
    if p <= 0.0 or p >= 1.0:
        return 1.0 if k == round(p * n) else 0.0
    x = np.arange(1, n + 1, dtype=np.float64)
    log_choose = np.concatenate(([0.0], np.cumsum(np.log(n - x + 1) - np.log(x))))
    xs = np.arange(n + 1)
    log_pmf = log_choose + xs * math.log(p) + (n - xs) * math.log1p(-p)
    pmf = np.exp(log_pmf - log_pmf.max())
    total = pmf.sum()
    mine = pmf[k]
    return float(min(1.0, pmf[pmf <= mine * (1 + 1e-7)].sum() / total))


def low_outliers(
    values: np.ndarray,
    eligible: np.ndarray,
    *,
    mads: float = OUTLIER_MADS,
    floor: float = MAD_FLOOR,
    min_count: int = MIN_ANNOTATORS,
) -> tuple[np.ndarray, float | None]:
    """Which eligible values lie more than ``mads`` scaled MADs below the eligible median
    (scaled MAD = 1.4826 · median |x − median|, at least ``floor``); and that threshold (None
    when fewer than ``min_count`` values are eligible)."""
    values = np.asarray(values, dtype=np.float64)
    eligible = np.asarray(eligible, dtype=bool) & ~np.isnan(values)
    if eligible.sum() < min_count:
        return np.zeros(values.shape, dtype=bool), None
    ref = values[eligible]
    median = float(np.median(ref))
    spread = max(1.4826 * float(np.median(np.abs(ref - median))), floor)
    threshold = median - mads * spread
    return eligible & (values < threshold), threshold


# --------------------------------------------------------------------------- models


def model_wins(
    table: RankTable, models: np.ndarray, n_models: int
) -> tuple[np.ndarray, np.ndarray]:
    """Strict pairs between completions of different models, per prompt: ``(rows, pairs)``
    where ``rows[p, c]`` counts how often model ``pairs[c, 0]``'s completion was ranked above
    model ``pairs[c, 1]``'s in prompt p (only the model pairs that occur are columns).
    ``models``: (P, K) model index per slot (−1 = no model, left out)."""
    prompts, codes = [], []
    for i, j, d in pair_signs(table):
        mi, mj = models[table.prompt, i], models[table.prompt, j]
        ok = (d != 0) & (mi >= 0) & (mj >= 0) & (mi != mj)
        w = np.where(d > 0, mi, mj)[ok]
        lo = np.where(d > 0, mj, mi)[ok]
        prompts.append(table.prompt[ok])
        codes.append(w * n_models + lo)
    if not codes:
        return np.zeros((table.n_prompts, 0)), np.zeros((0, 2), dtype=np.int64)
    code = np.concatenate(codes)
    used, column, _ = unique_ids(code)
    cells = np.concatenate(prompts) * used.size + column
    rows = np.bincount(cells, minlength=table.n_prompts * used.size).astype(np.float64)
    pairs = np.stack([used // max(n_models, 1), used % max(n_models, 1)], 1)
    return rows.reshape(table.n_prompts, used.size), pairs


def win_matrix(sums: np.ndarray, pairs: np.ndarray, n_models: int) -> np.ndarray:
    """(…, M, M) win matrices from column sums of :func:`model_wins` rows."""
    sums = np.asarray(sums, dtype=np.float64)
    out = np.zeros((*sums.shape[:-1], n_models, n_models))
    out[..., pairs[:, 0], pairs[:, 1]] = sums
    return out


def bradley_terry_many(
    wins: np.ndarray, *, prior: float = 0.5, max_iter: int = 500, tol: float = 1e-9
) -> np.ndarray:
    """:func:`app.ranking.bradley_terry` on many win matrices at once: ``wins`` (B, M, M) with
    ``wins[b, i, j]`` = weight of i beating j; returns (B, M) log-strengths, mean 0 (the same
    MM iteration, prior and normalisation, run until every matrix has converged)."""
    wins = np.array(wins, dtype=np.float64)
    b, m, _ = wins.shape
    if m == 0:
        return np.zeros((b, 0))
    idx = np.arange(m)
    wins[:, idx, idx] = 0.0
    total = prior + wins.sum(2)
    games = wins + wins.transpose(0, 2, 1)
    p = np.ones((b, m))
    for _ in range(max_iter):
        denom = 2.0 * prior / (p + 1.0) + (games / (p[:, :, None] + p[:, None, :])).sum(2)
        new = total / denom
        new /= np.exp(np.log(new).mean(1, keepdims=True))
        delta = np.abs(np.log(new) - np.log(p)).max() if new.size else 0.0
        p = new
        if delta < tol:
            break
    logs = np.log(p)
    return logs - logs.mean(1, keepdims=True)


# --------------------------------------------------------------------------- bootstrap


def resample_sums(
    rows: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    max_groups: int = MAX_GROUPS,
) -> np.ndarray:
    """Column sums of ``rows`` (one row per prompt) over ``resamples`` bootstrap resamples of
    the prompts (drawn with replacement, as many as there are): (resamples, D).

    Prompts with identical rows are interchangeable, so the resample is drawn exactly as a
    multinomial over the distinct rows. With more than ``max_groups`` distinct rows the prompts
    are dealt at random into ``max_groups`` blocks and the blocks are resampled; the blocks'
    sums are independent and identically distributed, so the resampled sums keep their mean
    and variance."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[:, None]
    n, dim = rows.shape
    if n == 0:
        return np.zeros((resamples, dim))
    rng = np.random.default_rng(seed)
    distinct, counts = _distinct_rows(rows)
    if distinct.shape[0] <= max_groups:
        draws = rng.multinomial(n, counts / n, size=resamples)
        return draws @ distinct
    block = np.empty(n, dtype=np.int64)
    block[rng.permutation(n)] = np.arange(n) % max_groups
    sums = np.stack(
        [np.bincount(block, weights=rows[:, c], minlength=max_groups) for c in range(dim)], 1
    )
    picks = rng.integers(0, max_groups, size=(resamples, max_groups))
    picks += np.arange(resamples)[:, None] * max_groups
    draws = np.bincount(picks.ravel(), minlength=resamples * max_groups)
    return draws.reshape(resamples, max_groups) @ sums


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_counts=True)``: the distinct rows in lexicographic
    order and their counts. Rows of small non-negative integers (counts, as here) are read as
    the digits of one integer, most significant first, so the same order comes from a linear
    pass instead of a sort of whole rows."""
    n, dim = rows.shape
    if n and np.all(rows >= 0) and np.all(rows == np.floor(rows)):
        base = int(rows.max()) + 1
        if dim * math.log2(base + 1) < 62:
            weights = base ** np.arange(dim - 1, -1, -1, dtype=np.int64)
            code = rows.astype(np.int64) @ weights
            _, inverse, first = unique_ids(code, first_index=True)
            assert first is not None
            return rows[first], np.bincount(inverse)
    return np.unique(rows, axis=0, return_counts=True)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """The percentile interval of bootstrap samples (NaN samples ignored)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None, None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def ratio_interval(
    num: np.ndarray, den: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float | None, float | None]:
    """95 % bootstrap interval of Σ num / Σ den, resampling prompts (rows)."""
    sums = resample_sums(np.stack([num, den], 1), resamples=resamples, seed=seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return interval(np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], np.nan))


def group_sum(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(index, weights=np.asarray(values, dtype=np.float64), minlength=n)


def group_median(index: np.ndarray, values: np.ndarray, n: int) -> list[float | None]:
    """Median of ``values`` (NaN ignored) per group 0 … n − 1 (None for an empty group)."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    index, values = index[keep], values[keep]
    order = np.lexsort((values, index))
    index, values = index[order], values[order]
    bounds = np.searchsorted(index, np.arange(n + 1))
    out: list[float | None] = []
    for g in range(n):
        part = values[bounds[g] : bounds[g + 1]]
        out.append(float(np.median(part)) if part.size else None)
    return out
