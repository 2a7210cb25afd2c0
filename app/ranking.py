"""Pure functions over rankings, shared by the export and the quality metrics (no database).

A *ranking* is a list of groups of completion ids, best first; a group of several ids is a tie
(``[[3], [1, 4], [2]]``: 3 best, 1 and 4 tied, 2 worst). Everything here is deterministic and
depends only on its arguments, so it is tested on hand-checked cases and with hypothesis.

Margins (the ``margin`` of an exported pair) are defined once, here:

* a tied pair has margin 0 (exported only with ``ties=keep``);
* a pairwise task (K = 2) answered with a strength has margin = the strength
  (1 = slightly better, 2 = much better);
* otherwise, when the annotator gave both completions a Likert score, margin = the Likert
  difference (chosen − rejected), floored at 0 — an annotator who ranks A above B but scores
  them equally expresses a preference of no measurable size;
* otherwise margin = 1.

A trainer that uses margins (Llama 2's ``−log σ(r_w − r_l − m)``) scales them itself.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Ranking = Sequence[Sequence[int]]
Split = Literal["train", "test"]
TIES = ("drop", "keep")


@dataclass(frozen=True, slots=True)
class Pair:
    """One ordered comparison inside one ranking: ``chosen`` is ranked above ``rejected``
    (or tied with it, when ``tie``)."""

    chosen: int
    rejected: int
    margin: float
    tie: bool = False


def positions(ranking: Ranking) -> dict[int, int]:
    """Completion id → the index of its group (0 = best)."""
    return {cid: rank for rank, group in enumerate(ranking) for cid in group}


def pair_margin(
    chosen: int,
    rejected: int,
    *,
    likert: Mapping[str, int] | None = None,
    strength: int | None = None,
) -> float:
    """The margin of a strict preference ``chosen`` > ``rejected`` (see the module docstring)."""
    if strength is not None:
        return float(strength)
    if likert:
        w, lo = likert.get(str(chosen)), likert.get(str(rejected))
        if w is not None and lo is not None:
            return float(max(w - lo, 0))
    return 1.0


def expand_pairs(
    ranking: Ranking,
    *,
    likert: Mapping[str, int] | None = None,
    strength: int | None = None,
    ties: Literal["drop", "keep"] = "drop",
) -> list[Pair]:
    """Every comparison a ranking implies, in ranking order.

    A ranking of groups g_1 … g_m gives Σ_{i<j} |g_i|·|g_j| strict pairs (each member of a
    better group over each member of a worse one). With ``ties="keep"`` each unordered pair
    inside a group is added once more, as a ``tie`` with margin 0 (chosen = the one listed
    first).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, not {ties!r}")
    out: list[Pair] = []
    for i, better in enumerate(ranking):
        if ties == "keep":
            for a in range(len(better)):
                for b in range(a + 1, len(better)):
                    out.append(Pair(better[a], better[b], 0.0, tie=True))
        for worse in ranking[i + 1 :]:
            for w in better:
                for lo in worse:
                    out.append(Pair(w, lo, pair_margin(w, lo, likert=likert, strength=strength)))
    return out


def count_strict_pairs(ranking: Ranking) -> int:
    """Σ_{i<j} |g_i|·|g_j|: the number of strict pairs :func:`expand_pairs` gives."""
    sizes = [len(g) for g in ranking]
    total = sum(sizes)
    return (total * total - sum(s * s for s in sizes)) // 2


def bradley_terry(
    n_items: int,
    comparisons: Iterable[tuple[int, int, float]],
    *,
    prior: float = 0.5,
    max_iter: int = 500,
    tol: float = 1e-9,
) -> list[float]:
    """Bradley–Terry log-strengths (mean 0) by Hunter's MM algorithm.

    ``comparisons`` are ``(winner, loser, weight)`` with item indices in ``range(n_items)``; a
    tie is two half-weight comparisons, one each way. ``prior`` adds that many virtual wins
    and losses of every item against a fixed average item (a weak Gaussian-like prior), which
    keeps the estimate finite for items that always won or always lost and for items never
    compared (they stay at 0). P(i beats j) = σ(s_i − s_j).
    """
    if prior <= 0:
        raise ValueError("prior must be positive (it keeps every strength finite)")
    if n_items == 0:
        return []
    wins = [prior] * n_items
    games: dict[tuple[int, int], float] = {}
    for w, lo, weight in comparisons:
        if w == lo or weight <= 0:
            continue
        wins[w] += weight
        key = (w, lo) if w < lo else (lo, w)
        games[key] = games.get(key, 0.0) + weight
    p = [1.0] * n_items
    for _ in range(max_iter):
        denom = [2.0 * prior / (p[i] + 1.0) for i in range(n_items)]
        for (i, j), n in games.items():
            d = n / (p[i] + p[j])
            denom[i] += d
            denom[j] += d
        new = [wins[i] / denom[i] if denom[i] > 0 else p[i] for i in range(n_items)]
        # Normalise to geometric mean 1 (the virtual item keeps the scale; this keeps it tidy).
        g = math.exp(sum(math.log(x) for x in new) / n_items)
        new = [x / g for x in new]
        delta = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, p, strict=True))
        p = new
        if delta < tol:
            break
    logs = [math.log(x) for x in p]
    mean = sum(logs) / n_items
    return [x - mean for x in logs]


def consensus_ranking(
    items: Sequence[int], rankings: Iterable[Ranking], *, prior: float = 0.5
) -> tuple[list[list[int]], dict[int, float]]:
    """Aggregate several annotators' rankings of the same completions by Bradley–Terry.

    Every strict pair of every ranking is one win; a tie is half a win each way. Returns the
    consensus as groups (items with equal scores, to 1e-9, share a group) and each item's
    log-strength."""
    index = {cid: i for i, cid in enumerate(items)}
    comps: list[tuple[int, int, float]] = []
    for ranking in rankings:
        for pair in expand_pairs(ranking, ties="keep"):
            if pair.chosen not in index or pair.rejected not in index:
                continue
            a, b = index[pair.chosen], index[pair.rejected]
            if pair.tie:
                comps.append((a, b, 0.5))
                comps.append((b, a, 0.5))
            else:
                comps.append((a, b, 1.0))
    scores = bradley_terry(len(items), comps, prior=prior)
    order = sorted(range(len(items)), key=lambda i: (-scores[i], items[i]))
    groups: list[list[int]] = []
    last: float | None = None
    for i in order:
        if last is not None and abs(scores[i] - last) <= 1e-9:
            groups[-1].append(items[i])
        else:
            groups.append([items[i]])
            last = scores[i]
    return groups, {items[i]: scores[i] for i in range(len(items))}


def pairwise_agreement(a: Ranking, b: Ranking) -> tuple[int, int]:
    """``(agreeing, compared)`` over the pairs of items both rankings contain and both rank
    strictly (a pair either annotator tied is left out). InstructGPT's inter-annotator
    agreement is Σ agreeing / Σ compared over all pairs of annotators of the same prompt."""
    pa, pb = positions(a), positions(b)
    common = sorted(set(pa) & set(pb))
    agree = compared = 0
    for x in range(len(common)):
        for y in range(x + 1, len(common)):
            i, j = common[x], common[y]
            da, db = pa[i] - pa[j], pb[i] - pb[j]
            if da == 0 or db == 0:
                continue
            compared += 1
            agree += (da > 0) == (db > 0)
    return agree, compared


def split_of(key: str, *, seed: int, test_fraction: float) -> Split:
    """``"test"`` for a stable pseudo-random ``test_fraction`` of keys, else ``"train"``.

    The draw depends only on the key (a prompt's external id) and the seed, so a prompt keeps
    its side when more data arrives and all rows of one prompt are on the same side."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError("test_fraction must be between 0 and 1")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"


def pseudonym(user_id: int, *, secret: str) -> str:
    """A stable pseudonym for an annotator (HMAC of the user id under the server's secret
    key): the same person has the same pseudonym in every export, and the username cannot be
    recovered from it."""
    mac = hmac.new(secret.encode(), f"annotator:{user_id}".encode(), hashlib.sha256)
    return "ann-" + mac.hexdigest()[:12]
