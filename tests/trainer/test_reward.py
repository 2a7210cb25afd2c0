"""trainer/reward.py: the K-way loss, one forward row per completion, every parameter trained,
the score read at the last real token, a synthetic preference learnt, resume = uninterrupted,
normalisation, evaluation metrics and the reward-model loader."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tests.trainer.conftest import marker_rankings, write_jsonl
from trainer import data as D
from trainer import reward as R
from trainer.config import RewardConfig
from trainer.models import load_reward_backbone


def test_kway_loss_is_the_mean_of_pairwise_losses():
    torch.manual_seed(0)
    rewards = torch.randn(4 + 3)  # a K = 4 ranking then a K = 3 ranking
    pairs_a = list(itertools.combinations(range(4), 2))
    pairs_b = [(4 + i, 4 + j) for i, j in itertools.combinations(range(3), 2)]
    pairs = pairs_a + pairs_b
    winners = torch.tensor([w for w, _ in pairs])
    losers = torch.tensor([lo for _, lo in pairs])
    margins = torch.zeros(len(pairs))
    owner = torch.tensor([0] * 6 + [1] * 3)
    loss = R.kway_loss(rewards, winners, losers, margins, owner, 2)

    def pairwise(ps):
        return torch.stack([-F.logsigmoid(rewards[w] - rewards[lo]) for w, lo in ps]).mean()

    expected = (pairwise(pairs_a) + pairwise(pairs_b)) / 2  # each ranking weighs the same
    assert torch.allclose(loss, expected)
    # K = 2 is the plain pairwise loss; a margin is subtracted inside the sigmoid
    one = R.kway_loss(rewards, winners[:1], losers[:1], torch.tensor([0.5]), owner[:1], 1)
    assert torch.allclose(one, -F.logsigmoid(rewards[0] - rewards[1] - 0.5))


def test_collate_gives_exactly_k_rows_per_ranking(tiny_model):
    _model, tok = load_reward_backbone(tiny_model)
    rows = marker_rankings(3, k=4) + marker_rankings(2, k=3, seed=1)
    comparisons = D.comparisons_from_rankings(rows).comparisons
    encoded = D.encode_comparisons(tok, comparisons, 128)
    batch = D.collate(encoded, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 * 4 + 2 * 3
    assert len(batch["winners"]) == 3 * 6 + 2 * 3
    assert batch["owner"].tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 3 + [4] * 3


def test_training_forwards_k_rows_per_ranking(tiny_model, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "r.jsonl", marker_rankings(8, k=4) + marker_rankings(4, k=3))
    seen = []
    real = R.forward_rewards

    def counting(model, input_ids, attention_mask):
        seen.append(input_ids.shape[0])
        return real(model, input_ids, attention_mask)

    monkeypatch.setattr(R, "forward_rewards", counting)
    config = RewardConfig(
        data=str(data),
        model=str(tiny_model),
        out=str(tmp_path / "out"),
        batch_size=12,
        eval_fraction=0.0,
        progress=False,
        max_steps=1,
    )
    R.train_reward(config, log=lambda *_: None)
    assert seen[0] == 8 * 4 + 4 * 3  # the training step: one row per completion, no more


def test_every_trainable_parameter_changes_after_one_step(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", marker_rankings(8, k=3))
    config = RewardConfig(
        data=str(data),
        model=str(tiny_model),
        out=str(tmp_path / "out"),
        batch_size=8,
        eval_fraction=0.0,
        progress=False,
        max_steps=1,
        lr=1e-2,
    )
    R.train_reward(config, log=lambda *_: None)
    before, _ = load_reward_backbone(tiny_model, seed=config.seed)
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    after_params = dict(after.named_parameters())
    for name, param in before.named_parameters():
        assert not torch.equal(param, after_params[name]), f"{name} did not change"


def test_reward_read_at_last_real_token_left_and_right_padding(tiny_model):
    model, tok = load_reward_backbone(tiny_model)
    model.eval()
    seqs = [tok("hello world, the quick fox")["input_ids"], tok("hi")["input_ids"]]
    seqs = [[*s, tok.eos_token_id] for s in seqs]
    alone = torch.stack(
        [R.forward_rewards(model, torch.tensor([s]), torch.ones(1, len(s))) for s in seqs]
    ).squeeze(-1)
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    assert pad != tok.eos_token_id
    for side in ("right", "left"):
        ids = torch.full((2, width), pad)
        mask = torch.zeros((2, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, span] = torch.tensor(s)
            mask[i, span] = 1
        with torch.no_grad():
            got = R.forward_rewards(model, ids, mask)
        assert torch.allclose(got, alone, atol=1e-5), side
    # the score depends on the last real token (EOS), not on the pad after it
    with torch.no_grad():
        other = R.forward_rewards(model, torch.tensor([seqs[1][:-1]]), torch.ones(1, 2))
    assert not torch.allclose(other, alone[1:2])


def test_head_initialised_with_inverse_sqrt_std(tiny_model):
    model, _ = load_reward_backbone(tiny_model, seed=3)
    head = model.score.weight
    d = head.shape[1]
    assert head.shape[0] == 1
    # 32 draws: the sample std is within a loose band around 1/sqrt(d+1)
    assert 0.5 / (d + 1) ** 0.5 < head.std().item() < 1.5 / (d + 1) ** 0.5


def _marker_config(tmp_path, tiny_model, **kw):
    rows = marker_rankings(240, k=2, seed=7)
    data = write_jsonl(tmp_path / "marker.jsonl", rows)
    base = dict(
        data=str(data),
        model=str(tiny_model),
        out=str(tmp_path / "out"),
        batch_size=8,
        lr=3e-3,
        epochs=2,
        eval_fraction=0.2,
        progress=False,
        max_length=64,
    )
    base.update(kw)
    return RewardConfig(**base)


def test_synthetic_preference_is_learnt(tiny_model, tmp_path):
    """Completions with a marker word always win: ≥ 95 % held-out accuracy within 2 minutes."""
    start = time.perf_counter()
    metrics = R.train_reward(_marker_config(tmp_path, tiny_model), log=lambda *_: None)
    elapsed = time.perf_counter() - start
    assert metrics["test"]["pairs"] >= 30
    assert metrics["test"]["accuracy"] >= 0.95, metrics["test"]
    assert elapsed < 120
    out = tmp_path / "out"
    meta = json.loads((out / "prefero_reward.json").read_text())
    assert meta["format"] == "prefero-reward/1"
    assert abs(meta["normalisation"]["bias"] + meta["normalisation"]["raw_mean"]) < 1e-9
    assert (out / "training.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] >= 0.95
    # the loader applies the normalisation: training completions average to ~0
    rm = R.load_reward_model(out, device="cpu")
    comparisons = D.load_source(str(tmp_path / "marker.jsonl")).comparisons
    split = D.split_comparisons(comparisons, eval_fraction=0.2, seed=0)
    prompts = [c.prompt for c in split.train for _ in c.completions]
    texts = [t for c in split.train for t in c.completions]
    scores = rm.score(prompts, texts)
    assert abs(scores.mean().item()) < 1e-3
    assert abs(scores.std().item() - meta["normalisation"]["std"]) < 1e-3
    win = rm.score([[{"role": "user", "content": "the sea"}]] * 2, ["good blue dog", "good dog"])
    assert win[0] > win[1]


def test_resume_equals_an_uninterrupted_run(tiny_model, tmp_path):
    rows = marker_rankings(36, k=3, seed=2)
    data = write_jsonl(tmp_path / "r.jsonl", rows)

    def config(out, **kw):
        return RewardConfig(
            data=str(data),
            model=str(tiny_model),
            out=str(tmp_path / out),
            batch_size=8,
            lr=1e-3,
            eval_fraction=0.2,
            progress=False,
            max_length=64,
            save_every=2,
            **kw,
        )

    full = R.train_reward(config("full"), log=lambda *_: None)
    stopped = R.train_reward(config("resumed"), stop_after_steps=3, log=lambda *_: None)
    assert stopped == {"stopped_at": 3}
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    resumed = R.train_reward(config("resumed", resume=True), log=lambda *_: None)
    assert resumed["test"]["accuracy"] == full["test"]["accuracy"]
    assert resumed["test"]["loss"] == pytest.approx(full["test"]["loss"], abs=1e-6)
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    steps = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert not (tmp_path / "resumed" / "checkpoint").exists()  # removed once finished


def test_seeded_runs_are_reproducible(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", marker_rankings(40, k=2, seed=5))

    def run(out):
        config = RewardConfig(
            data=str(data),
            model=str(tiny_model),
            out=str(tmp_path / out),
            batch_size=8,
            lr=1e-3,
            eval_fraction=0.3,
            progress=False,
            max_length=64,
            max_steps=3,
        )
        return R.train_reward(config, log=lambda *_: None)

    assert run("a")["test"] == run("b")["test"]


def test_kendall_tau_and_calibration():
    assert R.kendall_tau([0, 1, 2], [3.0, 2.0, 1.0]) == 1.0
    assert R.kendall_tau([0, 1, 2], [1.0, 2.0, 3.0]) == -1.0
    assert R.kendall_tau([0, 0, 1], [1.0, 1.0, 0.0]) == 1.0
    # confident and right → small ECE; confident and half wrong → large
    assert R.expected_calibration_error([8.0] * 10) < 0.01
    assert R.expected_calibration_error([8.0] * 5 + [-8.0] * 5) > 0.45


def test_metrics_strict_accuracy_ties_apart_and_breakdowns():
    comparisons = [
        D.Comparison(
            [], ["a", "b", "c"], [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)], "k", ranks=[0, 1, 2]
        ),
        D.Comparison([], ["a", "b"], [(0, 1, 1.0)], "k2", ranks=[0, 1]),
    ]
    encoded = [
        D.Encoded(comparisons[0], [[1] * 10] * 3, True),
        D.Encoded(comparisons[1], [[1] * 70] * 2, False),
    ]
    scores = [torch.tensor([2.0, 1.0, 1.0]), torch.tensor([0.0, 1.0])]
    m = R.metrics_from_scores(encoded, scores)
    assert m["pairs"] == 4
    assert m["accuracy"] == 0.5  # (0>1, 0>2) right, (1,2) tied, (0,1) of K=2 wrong
    assert m["tie_rate"] == 0.25
    assert m["accuracy_by_k"] == {"2": 0.0, "3": 2 / 3}
    assert m["accuracy_by_length"] == {"0-63": 2 / 3, "64-127": 0.0}
    assert m["truncated_rankings"] == 1


def test_micro_batches_give_the_same_step(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", marker_rankings(8, k=4) + marker_rankings(4, k=2))

    def run(out, micro):
        config = RewardConfig(
            data=str(data),
            model=str(tiny_model),
            out=str(tmp_path / out),
            batch_size=12,
            lr=1e-3,
            eval_fraction=0.0,
            progress=False,
            max_steps=2,
            micro_batch_size=micro,
        )
        R.train_reward(config, log=lambda *_: None)
        return AutoModelForSequenceClassification.from_pretrained(tmp_path / out).state_dict()

    whole, micro = run("whole", None), run("micro", 5)
    for name in whole:
        assert torch.allclose(whole[name], micro[name], atol=1e-5), name


def test_the_normalisation_sample_takes_whole_rankings_up_to_the_limit():
    encoded = [
        D.Encoded(D.Comparison([], ["a", "b"], [(0, 1, 0.0)], f"p{i}"), [[i], [i + 100]], False)
        for i in range(10)
    ]
    sample = R.normalisation_sample(encoded, limit=5, seed=0)
    assert sum(len(e.rows) for e in sample) == 6  # three whole rankings: the first ≥ 5
    assert len({e.comparison.prompt_key for e in sample}) == 3
    assert sample == R.normalisation_sample(encoded, limit=5, seed=0)  # seeded
    assert R.normalisation_sample(encoded, limit=0, seed=0) == encoded  # 0: all of them
    assert R.normalisation_sample(encoded, limit=20, seed=0) == encoded  # fewer than the limit
