"""app.metrics: hand-checked small cases (perfect agreement, total disagreement, ties, a
position-biased annotator, a known Bradley–Terry fit) and hypothesis properties (agreement
in [0, 1], invariance under relabelling, the vectorised statistics equal the slow reference
built on app.ranking, the text parser equals json.loads, alpha equals the krippendorff package)."""

from __future__ import annotations

import json
import math

import krippendorff
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import metrics
from app.ranking import bradley_terry, pairwise_agreement

A, B, C, D = 11, 12, 13, 14  # completion ids of one prompt


def table(rankings, prompts=None, users=None, shown=None):
    n = len(rankings)
    return metrics.encode_rankings(
        prompts if prompts is not None else [1] * n,
        users if users is not None else list(range(1, n + 1)),
        rankings,
        shown,
    )


# --------------------------------------------------------------------------- encoding


def test_positions_are_mid_ranks_and_ties_share_them():
    t = table([[[A], [B, C], [D]], [[D], [C], [B], [A]]])
    assert t.slot_ids.tolist() == [[A, B, C, D]]
    assert t.pos.tolist() == [[1.0, 2.5, 2.5, 4.0], [4.0, 3.0, 2.0, 1.0]]
    assert t.top.tolist() == [[True, False, False, False], [False, False, False, True]]


def test_unranked_completions_are_nan_and_prompts_get_their_own_slots():
    t = table([[[A], [B]], [[21], [22], [23]]], prompts=[1, 2], users=[1, 1])
    assert t.k == 3
    assert np.isnan(t.pos[0, 2])
    assert t.slot_ids.tolist() == [[A, B, -1], [21, 22, 23]]
    assert t.slots_of(np.array([B, 23, 99])).tolist() == [1, 2, -1]


def test_texts_and_lists_encode_alike():
    rankings = [[[A], [B, C], [D]], [], [[D], [A]], [[123456789012], [7]]]
    texts = [json.dumps(r) for r in rankings]
    shown = [[B, A, C, D], [], [A, D], [7, 123456789012]]
    by_list = metrics.encode_rankings([1, 2, 1, 3], [5, 5, 6, 5], rankings, shown)
    by_text = metrics.encode_ranking_texts([1, 2, 1, 3], [5, 5, 6, 5], texts, [B, -1, A, 7])
    assert by_text is not None
    np.testing.assert_array_equal(by_text.pos, by_list.pos)
    np.testing.assert_array_equal(by_text.top, by_list.top)
    np.testing.assert_array_equal(by_text.first, by_list.first)
    np.testing.assert_array_equal(by_text.slot_ids, by_list.slot_ids)


@pytest.mark.parametrize("text", ['[["a"]]', "[[1.5]]", "[[-1]]", "[1, 2]", '[[1], "x"]', "[[é]]"])
def test_texts_that_are_not_id_rankings_are_refused(text):
    assert metrics.encode_ranking_texts([1], [1], [text]) is None


json_ints = st.recursive(
    st.integers(0, 10**15),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.from_regex(r"\A[0-9]{1,6}\Z"), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(st.lists(json_ints, max_size=6))
def test_parse_int_json_reads_the_integers_json_loads_reads(values):
    texts = [json.dumps(v) for v in values]
    parsed = metrics.parse_int_json(texts)
    assert parsed is not None
    expected_rows, expected = [], []

    def walk(v, row):
        if isinstance(v, int):
            expected_rows.append(row)
            expected.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x, row)
        else:
            for k, x in v.items():
                expected_rows.append(row)
                expected.append(int(k))
                walk(x, row)

    for row, v in enumerate(values):
        walk(v, row)
    assert parsed.value.tolist() == expected
    assert parsed.row.tolist() == expected_rows


# --------------------------------------------------------------------------- agreement


def test_perfect_agreement():
    r = [[A], [B], [C], [D]]
    agree = metrics.agreement(table([r, r, r]))
    assert agree.prompt_compared.tolist() == [18]  # 3 annotator pairs × 6 completion pairs
    assert agree.rate == 1.0
    assert agree.consensus_agree.tolist() == [6, 6, 6]
    assert agree.consensus_compared.tolist() == [6, 6, 6]
    assert metrics.rank_alpha(table([r, r, r])) == pytest.approx(1.0)


def test_total_disagreement():
    agree = metrics.agreement(table([[[A], [B], [C]], [[C], [B], [A]]]))
    assert (agree.prompt_agree.sum(), agree.prompt_compared.sum()) == (0, 3)
    assert agree.rate == 0.0
    assert agree.consensus_agree.tolist() == [0, 0]
    assert agree.consensus_compared.tolist() == [3, 3]


def test_ties_are_left_out_of_pairwise_agreement():
    # a ties B and C; b orders them: that pair is not compared. The others agree.
    agree = metrics.agreement(table([[[A], [B, C]], [[A], [B], [C]]]))
    assert (agree.prompt_agree.sum(), agree.prompt_compared.sum()) == (2, 2)
    assert pairwise_agreement([[A], [B, C]], [[A], [B], [C]]) == (2, 2)


def test_leave_one_out_consensus_is_the_majority_of_the_others():
    good = [[A], [B], [C]]
    agree = metrics.agreement(table([good, good, good, [[C], [B], [A]]]))
    # The dissenter disagrees with the (unanimous) others on all three pairs; each of the
    # others still has a 2-to-1 majority with it.
    assert agree.consensus_agree.tolist() == [3, 3, 3, 0]
    assert agree.consensus_compared.tolist() == [3, 3, 3, 3]
    # A split majority (1 to 1) decides nothing.
    split = metrics.agreement(table([good, good, [[C], [B], [A]]]))
    assert split.consensus_compared.tolist() == [0, 0, 3]


def test_a_single_annotator_has_nothing_to_agree_with():
    agree = metrics.agreement(table([[[A], [B]]]))
    assert agree.rate is None
    assert agree.consensus_compared.tolist() == [0]
    assert metrics.rank_alpha(table([[[A], [B]]])) is None


rankings_of = st.permutations([A, B, C, D]).flatmap(
    lambda order: st.lists(st.integers(1, 3), min_size=4, max_size=4).map(
        lambda cuts: _group(order, cuts)
    )
)


def _group(order, cuts):
    groups, current = [], []
    for cid, cut in zip(order, cuts, strict=True):
        current.append(cid)
        if cut > 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


prompt_sets = st.lists(st.lists(rankings_of, min_size=1, max_size=4), min_size=1, max_size=4)


def _flatten(prompts):
    rankings, prompt_ids, users = [], [], []
    for p, rs in enumerate(prompts):
        for u, r in enumerate(rs):
            rankings.append([[cid + 100 * p for cid in g] for g in r])
            prompt_ids.append(p)
            users.append(u)
    return rankings, prompt_ids, users


@settings(max_examples=60, deadline=None)
@given(prompt_sets)
def test_agreement_equals_the_reference_on_app_ranking(prompts):
    rankings, prompt_ids, users = _flatten(prompts)
    agree = metrics.agreement(table(rankings, prompt_ids, users))
    ok = total = 0
    for p in set(prompt_ids):
        mine = [r for r, q in zip(rankings, prompt_ids, strict=True) if q == p]
        for i in range(len(mine)):
            for j in range(i + 1, len(mine)):
                a, c = pairwise_agreement(mine[i], mine[j])
                ok, total = ok + a, total + c
    assert (agree.prompt_agree.sum(), agree.prompt_compared.sum()) == (ok, total)
    assert agree.rate is None or 0.0 <= agree.rate <= 1.0
    # Pooled over annotations, agreement with the others counts each annotator pair twice.
    assert agree.others_agree.sum() == 2 * ok
    assert agree.others_compared.sum() == 2 * total
    assert np.all(agree.consensus_agree <= agree.consensus_compared)


@settings(max_examples=40, deadline=None)
@given(prompt_sets, st.randoms(use_true_random=False))
def test_agreement_does_not_depend_on_the_order_of_annotations_or_ids(prompts, rnd):
    rankings, prompt_ids, users = _flatten(prompts)
    base = metrics.agreement(table(rankings, prompt_ids, users))
    order = list(range(len(rankings)))
    rnd.shuffle(order)
    relabel = {cid: 10_000 - cid for r in rankings for g in r for cid in g}
    shuffled = [[[relabel[c] for c in g] for g in rankings[i]] for i in order]
    again = metrics.agreement(
        table(shuffled, [prompt_ids[i] for i in order], [users[i] for i in order])
    )
    assert again.prompt_agree.sum() == base.prompt_agree.sum()
    assert again.prompt_compared.sum() == base.prompt_compared.sum()
    assert sorted(again.consensus_agree.tolist()) == sorted(base.consensus_agree.tolist())


# --------------------------------------------------------------------------- alpha and Likert


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=4, max_size=4), min_size=2, max_size=30),
    st.sampled_from(["nominal", "ordinal", "interval"]),
)
def test_alpha_equals_the_krippendorff_package(counts, level):
    counts = np.asarray(counts)
    domain = np.asarray([1.0, 2.0, 3.5, 7.0])
    pairable = counts[counts.sum(1) >= 2]
    ours = metrics.krippendorff_alpha(counts, domain, level)
    if ours is None:
        assert pairable.shape[0] == 0 or (pairable.sum(0) > 0).sum() < 2
        return
    theirs = krippendorff.alpha(
        value_counts=pairable, value_domain=domain, level_of_measurement=level
    )
    assert ours == pytest.approx(float(theirs), abs=1e-9)


def test_likert_exact_and_within_one_matches():
    t = table([[[A], [B]], [[A], [B]], [[A], [B]]])
    scores = np.array([[7, 3], [7, 4], [6, 1]], dtype=float)
    likert = metrics.likert_agreement(t, scores)
    # Completion A: 7, 7, 6 → pairs (7,7) exact, (7,6) ×2 within one. B: 3, 4, 1 → (3,4) within.
    assert likert.pairs == 6
    assert likert.exact == pytest.approx(1 / 6)
    assert likert.within_one == pytest.approx(4 / 6)
    assert likert.alpha is not None
    assert likert.alpha > 0.5
    perfect = metrics.likert_agreement(t, np.array([[7, 2], [7, 2], [7, 2]], dtype=float))
    assert (perfect.exact, perfect.within_one, perfect.alpha) == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- biases


def test_position_bias_counts_first_shown_in_the_best_group():
    t = table(
        [[[A], [B], [C], [D]], [[B], [A], [C], [D]], [[A, B], [C], [D]]],
        shown=[[A, B, C, D], [A, B, C, D], [B, A, C, D]],
    )
    bias = metrics.position_bias(t)
    assert bias.won.tolist() == [True, False, True]
    assert bias.expected.tolist() == [0.25, 0.25, 0.5]


def test_length_bias_counts_strict_pairs_of_different_lengths():
    t = table([[[A], [B], [C]], [[C], [B, A]]])
    lengths = np.array([[10.0, 20.0, 20.0]])  # A short; B and C equally long
    longer_won, pairs = metrics.length_bias(t, lengths)
    # first: A>B (shorter won), A>C (shorter won), B>C (same length: left out)
    # second: C>B (same length), C>A (longer won); B=A tie: left out
    assert pairs.tolist() == [2, 1]
    assert longer_won.tolist() == [0, 1]


def test_binomial_p_matches_hand_computed_values():
    assert metrics.binomial_p(5, 10, 0.5) == pytest.approx(1.0)
    assert metrics.binomial_p(0, 10, 0.5) == pytest.approx(2 / 1024)
    assert metrics.binomial_p(7, 7, 0.25) == pytest.approx(0.25**7)
    assert metrics.binomial_p(0, 0, 0.3) == 1.0


def test_low_outliers_uses_median_and_scaled_mad_with_a_floor():
    values = np.array([0.70, 0.72, 0.74, 0.71, 0.40, np.nan])
    eligible = np.array([True, True, True, True, True, True])
    flagged, threshold = metrics.low_outliers(values, eligible)
    assert flagged.tolist() == [False, False, False, False, True, False]
    # median 0.71, MAD 0.01 → scaled 0.0148 < floor 0.05 → 0.71 − 2·0.05
    assert threshold == pytest.approx(0.61)
    none, no_threshold = metrics.low_outliers(values[:2], eligible[:2])
    assert not none.any()
    assert no_threshold is None


# --------------------------------------------------------------------------- models, bootstrap


def test_bradley_terry_many_equals_app_ranking():
    wins = np.array([[0, 8, 3], [2, 0, 5], [1, 4, 0]], dtype=float)
    ours = metrics.bradley_terry_many(wins[None])[0]
    reference = bradley_terry(
        3, [(i, j, wins[i, j]) for i in range(3) for j in range(3) if wins[i, j]]
    )
    np.testing.assert_allclose(ours, reference, atol=1e-7)
    assert ours[0] > ours[1] > ours[2]


def test_model_wins_counts_strict_pairs_between_models():
    t = table([[[A], [B], [C]], [[C], [A, B]]])
    models = np.array([[0, 1, 1]])  # A is model 0, B and C model 1
    rows, pairs = metrics.model_wins(t, models, 2)
    wins = metrics.win_matrix(rows.sum(0), pairs, 2)
    # first: A>B, A>C (model 0 wins twice); second: C>A (model 1 wins once); B>C same model.
    assert wins.tolist() == [[0, 2], [1, 0]]


def test_resample_sums_is_seeded_and_keeps_the_mean():
    rows = np.array([[1, 2], [0, 2], [1, 2], [2, 2]], dtype=float)
    a = metrics.resample_sums(rows, resamples=2000, seed=7)
    b = metrics.resample_sums(rows, resamples=2000, seed=7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2000, 2)
    assert np.all(a[:, 1] == 8)  # every resample has 4 prompts
    assert a[:, 0].mean() == pytest.approx(4.0, rel=0.05)


def test_resample_sums_by_blocks_keeps_mean_and_variance():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(5000, 1))
    exact_sd = math.sqrt(5000) * rows.std()
    sums = metrics.resample_sums(rows, resamples=2000, seed=3, max_groups=500)
    assert sums[:, 0].mean() == pytest.approx(rows.sum(), abs=3 * exact_sd / math.sqrt(2000) + 1)
    assert sums[:, 0].std() == pytest.approx(exact_sd, rel=0.1)


def test_ratio_interval_contains_the_estimate_and_is_empty_without_data():
    agree = np.array([3, 2, 3, 1, 3, 0], dtype=float)
    compared = np.full(6, 3.0)
    low, high = metrics.ratio_interval(agree, compared)
    assert low <= agree.sum() / compared.sum() <= high
    assert 0.0 <= low < high <= 1.0
    assert metrics.ratio_interval(np.zeros(0), np.zeros(0)) == (None, None)


def test_group_median():
    index = np.array([0, 0, 0, 2, 2])
    values = np.array([3.0, 1.0, np.nan, 4.0, 6.0])
    assert metrics.group_median(index, values, 3) == [2.0, None, 5.0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**62), max_size=40),
    st.sampled_from([1, 10, 10_000, 2**62]),
)
def test_unique_ids_equals_numpy_unique(values, span):
    """Dense ids (a lookup table) and sparse ones (numpy's sort) give np.unique's answer."""
    a = np.asarray([v % span for v in values], dtype=np.int64)
    keys, inverse, first = metrics.unique_ids(a, first_index=True)
    want_keys, want_first, want_inverse = np.unique(a, return_index=True, return_inverse=True)
    assert keys.tolist() == want_keys.tolist()
    assert inverse.tolist() == want_inverse.reshape(-1).tolist()
    assert first.tolist() == want_first.tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda d: st.lists(
            st.lists(st.integers(0, 9) | st.integers(0, 10**6), min_size=d, max_size=d),
            min_size=1,
            max_size=30,
        )
    ),
    st.booleans(),
)
def test_distinct_rows_equals_numpy_unique_by_row(rows, fractional):
    """The bootstrap's distinct rows and counts, in np.unique's lexicographic order (the
    draws, and so the intervals, depend on that order)."""
    a = np.asarray(rows, dtype=np.float64)
    if fractional:
        a[0, 0] += 0.5  # not integers: numpy's own path
    distinct, counts = metrics._distinct_rows(a)
    want, want_counts = np.unique(a, axis=0, return_counts=True)
    assert distinct.tolist() == want.tolist()
    assert counts.tolist() == want_counts.tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.integers(1, 2**62), max_size=30),
    st.lists(st.integers(-1, 2**62), max_size=30),
    st.sampled_from([50, 2**62]),
)
def test_index_of_finds_each_query_among_the_keys(keys, queries, span):
    """Dense keys (a table) and sparse ones (a search) give each query's position, −1 absent."""
    keys = sorted({1 + k % span for k in keys}, reverse=True)  # distinct, not sorted ascending
    queries = [q % span if q >= 0 else q for q in queries] + keys[:3]
    at = metrics.index_of(np.asarray(keys, dtype=np.int64), np.asarray(queries, dtype=np.int64))
    position = {k: i for i, k in enumerate(keys)}
    assert at.tolist() == [position.get(q, -1) for q in queries]
