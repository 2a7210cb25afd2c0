"""PPO's numbered stages on tiny models (CPU, seconds each).

Policy: ``tests.tiny_models.build_tiny_chat_model`` (a two-layer Llama with a chat template).
Reward: ``build_tiny_reward_model`` (a directory shaped like ``prefero-train reward``'s output,
loaded through ``trainer.reward.load_reward_model``), or a rule-based scorer.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_tiny_chat_model, build_tiny_reward_model
from trainer import ops
from trainer.config import PPOConfig
from trainer.data import prompt_key_of
from trainer.ppo import (
    PPOError,
    PPOTrainer,
    Prompt,
    load_prompts,
    same_vocabulary,
    split_prompts,
    trim_widths,
)
from trainer.reward import load_reward_model

TIMING = ("time/", "tokens_per_s", "episodes_per_s")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest (and least disturbed by other processes) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo-models")
    policy = build_tiny_chat_model(root / "policy")
    dropout = build_tiny_chat_model(root / "dropout")
    config = json.loads((dropout / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (dropout / "config.json").write_text(json.dumps(config))
    return {
        "policy": policy,
        "dropout": dropout,
        "reward": build_tiny_reward_model(root / "reward", bias=0.25),
        "other": build_tiny_reward_model(root / "other", other_tokenizer=True),
    }


PROMPTS = [
    Prompt(key=f"k{i}", messages=[{"role": "user", "content": text}])
    for i, text in enumerate(
        [
            "Hi",
            "Write a short poem about the sea and the wind.",
            "List three colours.",
            "Translate into French: good morning, my friend.",
            "Explain what a preference dataset is, in one sentence.",
            "Hello! How are you today?",
            "Summarise: models learn from human feedback.",
            "Numbers 0123456789",
            "The quick brown fox jumps over the lazy dog.",
            "What is the weather like?",
        ]
    )
]


def config_for(models, out: Path, **overrides) -> PPOConfig:
    values = dict(
        policy=str(models["policy"]),
        reward=str(models["reward"]),
        prompts="(given)",
        out=str(out),
        steps=2,
        batch_size=4,
        mini_batches=2,
        ppo_epochs=2,
        max_new_tokens=6,
        eval_every=0,
        eval_max=4,
        eval_fraction=0.2,
        plot_every=0,
        progress=False,
        lr=1e-3,
    )
    values.update(overrides)
    return PPOConfig(**values)


def make_trainer(models, out: Path, **overrides) -> PPOTrainer:
    return PPOTrainer(config_for(models, out, **overrides), prompts=PROMPTS)


def trainable(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    named = {f"policy.{k}": v for k, v in trainer.unwrapped_policy.named_parameters()}
    named.update({f"value.{k}": v for k, v in trainer.value.named_parameters()})
    return {k: v.detach().clone() for k, v in named.items() if v.requires_grad}


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


class ConstantScorer:
    def __init__(self, value: float) -> None:
        self.value = value
        self.seen: list[tuple[list, str]] = []

    def score(self, messages_list, responses):
        self.seen += list(zip(messages_list, responses, strict=True))
        return torch.full((len(responses),), self.value)


# ------------------------------------------------------------------------------ one PPO step


def test_one_step_changes_every_trainable_parameter_of_policy_and_value(models, tmp_path):
    trainer = make_trainer(models, tmp_path)
    assert trainer.value_source == "reward"  # same vocabulary: the value model is the RM's
    before = trainable(trainer)
    row = trainer.train_step(0)
    after = trainable(trainer)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    assert any(k.startswith("value.") for k in before)
    # The reference never moves.
    ref = dict(trainer.ref.named_parameters())
    base = dict(type(trainer.ref).from_pretrained(models["policy"]).named_parameters())
    assert all(torch.equal(ref[k], base[k]) for k in base)
    # Stage health of the first step: policy = reference, ratio = 1 before the first update.
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    for key in (
        "objective/scores",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approx_kl",
        "policy/clipfrac",
        "val/explained_variance",
        "val/ratio",
        "val/eos_fraction",
        "time/generation_share",
        "tokens_per_s",
    ):
        assert math.isfinite(row.get(key, math.nan)), key
    assert 0 < row["time/generation_share"] < 1


def test_value_warmup_steps_train_only_the_value_model(models, tmp_path):
    trainer = make_trainer(models, tmp_path, value_warmup_steps=1, ptx_coef=0.0)
    before = trainable(trainer)
    row = trainer.train_step(0)  # a warm-up step: the policy stays as it was
    after = trainable(trainer)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved
    assert all(k.startswith("value.") for k in moved)
    assert row["policy/frozen"] == 1.0
    assert row["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # the policy never changed
    row = trainer.train_step(1)  # past the warm-up: both train
    assert row["policy/frozen"] == 0.0
    policy_after = trainable(trainer)
    assert any(not torch.equal(after[k], policy_after[k]) for k in after if k.startswith("policy."))


def test_value_warmup_fits_monte_carlo_returns(models, tmp_path):
    trainer = make_trainer(models, tmp_path, value_warmup_steps=1)
    r, _ = trainer.rollout(trainer.batch_prompts(0))
    trainer.compute_advantages(r, lam=1.0)
    # λ = 1: each token's return is the sum of the rewards from it to the end of the response
    # (gamma = 1), whatever the values are.
    to_end = (r.rewards * r.mask).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(r.returns[r.mask], to_end[r.mask], atol=1e-5)
    trainer.compute_advantages(r)  # the config's λ (0.95) bootstraps from the values
    assert not torch.allclose(r.returns[r.mask], to_end[r.mask], atol=1e-3)


def test_negative_value_warmup_steps_are_refused(models, tmp_path):
    with pytest.raises(PPOError, match="value_warmup_steps"):
        make_trainer(models, tmp_path, value_warmup_steps=-1)


def test_the_value_model_starts_as_the_reward_model(models, tmp_path):
    trainer = make_trainer(models, tmp_path)
    rm = load_reward_model(models["reward"])
    assert torch.equal(trainer.value.head.weight, rm.model.score.weight)
    # The reward model's normalisation is in the head: the value of a whole sequence is its
    # normalised score.
    assert rm.bias != 0
    assert trainer.value.head.bias.item() == pytest.approx(rm.bias)
    ids = torch.tensor([[5, 6, 7, 8]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        value = trainer.value(ids, attention)[0, -1]
        raw = rm.model(input_ids=ids, attention_mask=attention).logits[0, 0]
    assert value.item() == pytest.approx(raw.item() + rm.bias, abs=1e-5)
    embed = trainer.value.backbone.get_input_embeddings().weight
    assert torch.equal(embed, rm.model.get_input_embeddings().weight)


def test_dropout_is_off_in_training_mode(models, tmp_path):
    trainer = make_trainer(models, tmp_path, policy=str(models["dropout"]))
    for model in (trainer.unwrapped_policy, trainer.ref, trainer.value):
        for module in model.modules():
            assert not isinstance(module, torch.nn.Dropout) or module.p == 0
            for name, value in vars(module).items():
                if "dropout" in name and isinstance(value, float):
                    assert value == 0.0, (type(module).__name__, name)
    policy = trainer.unwrapped_policy.train()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    first = policy(input_ids=ids).logits
    second = policy(input_ids=ids).logits
    assert torch.equal(first, second)


def test_score_lands_on_the_eos_token_under_left_padding_and_cut_off_responses_are_penalised(
    models, tmp_path
):
    trainer = make_trainer(models, tmp_path, no_eos_penalty=-1.0, kl_coef=0.05)
    eos, pad = trainer.eos_ids[0], trainer.pad_id
    fixed = torch.tensor([[40, eos, 41, 42], [43, 44, 45, 46], [47, 48, eos, 49]])
    mask, has_eos = ops.response_mask(fixed, trainer.eos_ids)
    responses = torch.where(mask, fixed, torch.full_like(fixed, pad))
    trainer.sample = lambda model, q, qm, greedy=False: (responses, mask, has_eos)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[4]]  # different lengths: left padding
    rollout, _ = trainer.rollout(prompts)
    assert (rollout.query_mask[0] == 0).any()  # the short prompt is left-padded
    rm = load_reward_model(models["reward"])
    expected = rm.score([p.messages for p in prompts], rollout.texts)
    assert rollout.raw_scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert rollout.scores[1].item() == -1.0  # no EOS within max_new_tokens: fixed penalty
    assert rollout.scores[0].item() == pytest.approx(expected[0].item(), abs=1e-5)
    # Padding after EOS is masked: invalid log-probs, zero values.
    assert rollout.logprobs[0, 2:].eq(ops.INVALID_LOGPROB).all()
    assert rollout.values[0, 2:].eq(0).all()
    trainer.compute_advantages(rollout)
    kl = (rollout.logprobs - rollout.ref_logprobs) * mask
    assert kl.abs().max().item() == 0.0  # policy = reference before any update
    rewards = rollout.rewards
    assert rewards[0].tolist() == pytest.approx([0, rollout.scores[0].item(), 0, 0])
    assert rewards[1].tolist() == pytest.approx([0, 0, 0, -1.0])
    assert rewards[2].tolist() == pytest.approx([0, 0, rollout.scores[2].item(), 0])


def test_left_padding_does_not_change_the_log_probabilities(models, tmp_path):
    trainer = make_trainer(models, tmp_path)
    short, long = PROMPTS[0], PROMPTS[1]
    q, qm = trainer.encode([short, long])
    responses = torch.tensor([[40, 41, 42], [43, 44, 45]])
    mask = torch.ones_like(responses, dtype=torch.bool)
    batched, _ = trainer.forward_logprobs(trainer.policy, q, qm, responses, mask)
    q1, qm1 = trainer.encode([short])
    alone, _ = trainer.forward_logprobs(trainer.policy, q1, qm1, responses[:1], mask[:1])
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_trim_widths_drop_only_columns_that_are_padding_in_every_row():
    query_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert trim_widths(query_mask, mask) == (1, 3)
    assert trim_widths(query_mask[[0, 2]], mask[[0, 2]]) == (2, 3)
    assert trim_widths(query_mask[[1]], mask[[1]]) == (1, 1)
    full = torch.ones(2, 3, dtype=torch.long)
    assert trim_widths(full, torch.ones(2, 4, dtype=torch.bool)) == (0, 4)


def test_a_trimmed_mini_batch_has_the_log_probabilities_and_values_of_the_full_batch(
    models, tmp_path
):
    """The update slices each mini-batch to the columns it uses: same numbers as the rollout's
    full-width forward passes (which is what makes the first ratio 1)."""
    trainer = make_trainer(models, tmp_path)
    eos, pad = trainer.eos_ids[0], trainer.pad_id
    fixed = torch.tensor([[40, eos, 41, 42], [43, 44, 45, 46], [47, 48, eos, 49]])
    mask, has_eos = ops.response_mask(fixed, trainer.eos_ids)
    responses = torch.where(mask, fixed, torch.full_like(fixed, pad))
    trainer.sample = lambda model, q, qm, greedy=False: (responses, mask, has_eos)
    rollout, _ = trainer.rollout([PROMPTS[1], PROMPTS[0], PROMPTS[4]])
    mb = torch.tensor([1, 0])  # the short prompt and a response that ends early
    left, width = trim_widths(rollout.query_mask[mb], rollout.mask[mb])
    assert left > 0
    assert width == 4
    mb = torch.tensor([0])
    left, width = trim_widths(rollout.query_mask[mb], rollout.mask[mb])
    assert width == 2
    q, qm = rollout.queries[mb, left:], rollout.query_mask[mb, left:]
    r, m = rollout.responses[mb, :width], rollout.mask[mb, :width]
    logprobs, _ = trainer.forward_logprobs(trainer.policy, q, qm, r, m)
    values = trainer.forward_values(q, qm, r, m)
    assert torch.allclose(logprobs, rollout.logprobs[mb, :width], atol=1e-5)
    assert torch.allclose(values, rollout.values[mb, :width], atol=1e-5)


def test_final_evaluation_separates_finishing_from_better_answers(models, tmp_path):
    trainer = make_trainer(models, tmp_path, batch_size=2, eval_fraction=0.5, eval_max=4)
    policy, ref = trainer.unwrapped_policy, trainer.ref
    eos, pad = trainer.eos_ids[0], trainer.pad_id
    ended = torch.tensor([[40, eos, pad], [41, eos, pad]])
    cut = torch.tensor([[42, 43, 44], [45, 46, 47]])

    def sample(model, queries, query_mask, greedy=False):  # the policy ends, the reference not
        fixed = ended if model is policy else cut
        if model is ref:
            fixed = torch.stack([ended[0], cut[1]])  # except on the first prompt of each batch
        mask, has_eos = ops.response_mask(fixed, trainer.eos_ids)
        return fixed, mask, has_eos

    trainer.sample = sample
    raw = {"policy": 0.5, "reference": 0.25}

    class Scorer:
        def score(self, messages_list, responses):
            # One token each: the policy's texts come from token ids 40/41, the reference's
            # cut-off ones from 42-47 (three tokens); the first reference one is the policy's.
            return torch.tensor(
                [raw["policy"] if len(t) <= 2 else raw["reference"] for t in responses]
            )

    trainer.reward = Scorer()
    e = trainer.final_evaluation()
    n = e["prompts"]
    assert n == 4
    assert e["policy_eos_fraction"] == 1.0
    assert e["reference_eos_fraction"] == 0.5
    # With the penalty, the reference's cut-off half scores -1.
    assert e["reward_gain"] == pytest.approx(0.5 - (0.5 + -1.0) / 2)
    # Without it, the reward model's own scores.
    assert e["raw_reward_gain"] == pytest.approx(0.5 - (0.5 + 0.25) / 2)
    # Where both ended: the same answers, a tie.
    assert e["finished_prompts"] == 2
    assert e["finished_reward_gain"] == pytest.approx(0.0)
    assert e["finished_win_rate"] == 0.5


def test_no_eos_penalty_none_scores_cut_off_responses_normally(models, tmp_path):
    trainer = make_trainer(models, tmp_path, no_eos_penalty=None)
    scores, raw = trainer.score(PROMPTS[:2], ["a", "b"], torch.tensor([True, False]))
    assert torch.equal(scores, raw)
    trainer.config.no_eos_penalty = -3.0
    scores, raw = trainer.score(PROMPTS[:2], ["a", "b"], torch.tensor([True, False]))
    assert scores[0] == raw[0]
    assert scores[1].item() == -3.0


def test_different_tokenizers_decode_and_re_encode_for_scoring(models, tmp_path):
    trainer = make_trainer(models, tmp_path, reward=str(models["other"]))
    assert not same_vocabulary(trainer.tokenizer, trainer.reward_tokenizer)
    assert trainer.value_source == "policy"  # the RM cannot read the policy's token ids
    rollout, _ = trainer.rollout(PROMPTS[:4])
    rm = load_reward_model(models["other"])
    # The reward model scored the decoded text, re-encoded with ITS tokenizer and format.
    expected = rm.score([p.messages for p in PROMPTS[:4]], rollout.texts)
    assert rollout.raw_scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert rm.text(PROMPTS[0].messages, "x").startswith("\n\nHuman:")
    row = trainer.train_step(0)
    assert row["guard/skipped_rollout"] == 0.0
    with pytest.raises(PPOError, match="vocabulary"):
        make_trainer(models, tmp_path, reward=str(models["other"]), value_init="reward")


def test_nan_scores_skip_the_whole_batch_and_are_logged(models, tmp_path):
    trainer = PPOTrainer(
        config_for(models, tmp_path), reward=ConstantScorer(math.nan), prompts=PROMPTS
    )
    before = trainable(trainer)
    row = trainer.train_step(0)
    assert row["guard/skipped_rollout"] == 1.0
    assert all(torch.equal(v, trainable(trainer)[k]) for k, v in before.items())


def test_a_non_finite_loss_skips_the_mini_batch_and_is_logged(models, tmp_path):
    trainer = make_trainer(models, tmp_path, vf_coef=math.nan)
    before = trainable(trainer)
    row = trainer.train_step(0)
    assert row["guard/skipped_rollout"] == 0.0
    assert row["guard/skipped_minibatches"] == 4.0  # 2 epochs × 2 mini-batches
    assert all(torch.equal(v, trainable(trainer)[k]) for k, v in before.items())


def test_same_seed_gives_bit_identical_runs_and_another_seed_does_not(models, tmp_path):
    def run(seed: int):
        trainer = make_trainer(models, tmp_path / f"s{seed}", seed=seed)
        rows = [without_timing(trainer.train_step(s)) for s in range(2)]
        return rows, trainable(trainer)

    rows_a, params_a = run(0)
    rows_b, params_b = run(0)
    assert rows_a == rows_b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    rows_c, _ = run(1)
    assert rows_c != rows_a


def test_adaptive_kl_controller_moves_beta(models, tmp_path):
    trainer = make_trainer(models, tmp_path, target_kl=0.01, kl_horizon=10)
    rows = [trainer.train_step(s) for s in range(3)]
    assert rows[0]["kl_coef"] == 0.05
    assert trainer.kl_ctl.value != 0.05


def test_ptx_loss_is_added(models, tmp_path):
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("The quick brown fox jumps over the lazy dog.\nHello! How are you today?\n")
    trainer = make_trainer(models, tmp_path, ptx_coef=0.5, ptx_data=str(ptx))
    row = trainer.train_step(0)
    assert row["loss/ptx"] > 0
    with pytest.raises(PPOError, match="ptx"):
        make_trainer(models, tmp_path, ptx_coef=0.5)


def test_lora_trains_only_the_adapters_and_the_reference_is_the_adapter_switched_off(
    models, tmp_path
):
    trainer = make_trainer(models, tmp_path, lora=True, lora_r=4, lora_alpha=8)
    assert trainer.ref is None
    policy = trainer.unwrapped_policy
    frozen = {k: v.detach().clone() for k, v in policy.named_parameters() if not v.requires_grad}
    before = trainable(trainer)
    assert all("lora_" in k or k.startswith("value.head") for k in before)
    row = trainer.train_step(0)
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    after = trainable(trainer)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, dict(policy.named_parameters())[k]) for k, v in frozen.items())
    base = type(trainer.unwrapped_policy.get_base_model()).from_pretrained(models["policy"])
    ids = torch.tensor([[1, 50, 60, 70]])
    with trainer.reference() as ref:
        assert torch.allclose(ref(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)


# ----------------------------------------------------------------------- prompts and splits


def test_prompts_come_from_every_supported_source(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"annotation_id": 1, "prompt": "Say hi", "prompt_id": 7, "completions": []},
                {"annotation_id": 2, "prompt": "Say hi", "prompt_id": 7, "completions": []},
                {"annotation_id": 3, "prompt": chat, "prompt_id": 8, "completions": []},
            ]
        )
    )
    got = load_prompts(str(rankings))
    assert [p.key for p in got] == ["id:7", "id:8"]  # one prompt per prompt_id
    assert got[1].messages == chat
    plain = tmp_path / "prompts.jsonl"
    plain.write_text(json.dumps({"prompt": "Tell me a joke"}) + "\n")
    (p,) = load_prompts(str(plain))
    assert p.messages == [{"role": "user", "content": "Tell me a joke"}]
    assert p.key == prompt_key_of({}, p.messages)  # the reward model's split key
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as fh:
        row = {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant: Bye!",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant: No.",
        }
        fh.write(json.dumps(row) + "\n")
    (p,) = load_prompts(str(hh))
    assert [m["role"] for m in p.messages] == ["user", "assistant", "user"]
    assert p.messages[-1]["content"] == "Bye?"
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(PPOError, match="no prompts"):
        load_prompts(str(empty))


def test_held_out_prompts_never_train(models, tmp_path):
    many = [Prompt(f"k{i}", [{"role": "user", "content": f"p{i}"}]) for i in range(30)]
    train, held = split_prompts(many, fraction=0.2, seed=0)
    assert held
    assert train
    assert len(train) + len(held) == 30
    assert split_prompts(many, fraction=0.2, seed=0) == (train, held)  # stable
    assert split_prompts(many[:2], fraction=0.01, seed=0)[1]  # ≥ 1 held out when asked
    trainer = PPOTrainer(config_for(models, tmp_path, eval_fraction=0.2), prompts=many)
    assert {p.key for p in trainer.held_out} == {p.key for p in held}
    drawn = {p.key for step in range(12) for p in trainer.batch_prompts(step)}
    assert drawn == {p.key for p in train}  # several epochs: every train prompt, no held-out


@pytest.mark.parametrize(
    "name",
    [
        "export_rankings.jsonl",
        "export_rankings_chat.jsonl",
        "export_pairs.jsonl",
        "export_pairs_chat.jsonl",
        "export_hh.jsonl",
    ],
)
def test_prompts_from_the_golden_export_fixtures(name):
    """The export format is the contract with the service: every fixture yields its prompts,
    one per prompt id, keyed like the reward model's split."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    rows = [json.loads(line) for line in (fixtures / name).read_text().splitlines() if line]
    prompts = load_prompts(str(fixtures / name))
    if "prompt_id" in rows[0]:
        assert [p.key for p in prompts] == list(dict.fromkeys(f"id:{r['prompt_id']}" for r in rows))
    assert all(p.messages and p.messages[-1]["role"] == "user" for p in prompts)


def test_an_hh_transcript_given_as_the_prompt_becomes_messages(tmp_path):
    source = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"},
        {"prompt": "Human: is this a transcript? No, only a question."},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load_prompts(str(source))
    assert first.messages == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert second.messages == [{"role": "user", "content": rows[1]["prompt"]}]
