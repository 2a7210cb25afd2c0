"""End to end on the CPU: PPO raises a rule-based reward at bounded KL.

The reward counts a marker in the response text (the letter ``e``, which many tokens of the
tiny tokenizer contain). Starting from a random two-layer policy, the mean score must rise by
at least one standard deviation of the initial scores within 200 updates while the KL to the
reference stays ≤ 10 nats. The run stops as soon as that happens (about 40 updates, ~10 s).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from tests.tiny_models import build_tiny_chat_model
from trainer.config import PPOConfig
from trainer.ppo import PPOTrainer, Prompt

MARKER = "e"
WINDOW = 5


class MarkerReward:
    """A rule-based reward model: occurrences of ``MARKER`` in the response."""

    def score(self, messages_list, responses):
        return torch.tensor([float(text.count(MARKER)) for text in responses])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reward_rises_by_one_standard_deviation_at_bounded_kl(tmp_path):
    policy = build_tiny_chat_model(tmp_path / "policy")
    prompts = [
        Prompt(f"p{i}", [{"role": "user", "content": f"Write a poem number {i} about the sea."}])
        for i in range(40)
    ]
    config = PPOConfig(
        policy=str(policy),
        out=str(tmp_path / "run"),
        steps=200,
        batch_size=16,
        mini_batches=2,
        ppo_epochs=4,
        max_new_tokens=8,
        temperature=1.0,
        lr=5e-4,
        kl_coef=0.1,
        no_eos_penalty=None,  # a random policy never says EOS within 8 tokens
        eval_every=0,
        eval_fraction=0.0,
        progress=False,
    )
    trainer = PPOTrainer(config, reward=MarkerReward(), prompts=prompts)
    rows = []
    for step in range(config.steps):
        rows.append(trainer.train_step(step))
        if step == 2:
            # Initial score distribution: the first three rollouts (48 episodes).
            means = [r["objective/scores"] for r in rows]
            variances = [r["objective/scores_std"] ** 2 for r in rows]
            base_mean = statistics.fmean(means)
            base_std = (statistics.fmean(variances) + statistics.pvariance(means)) ** 0.5
        if step >= WINDOW + 2:
            recent = rows[-WINDOW:]
            score = statistics.fmean(r["objective/scores"] for r in recent)
            if score >= base_mean + base_std:
                break
    else:
        pytest.fail(f"the score never rose by one std ({base_mean:.2f} + {base_std:.2f})")
    kl = statistics.fmean(r["objective/kl"] for r in rows[-WINDOW:])
    assert kl <= 10.0, f"KL {kl:.1f} nats when the score reached +1 std (step {step + 1})"
    assert all(r["guard/skipped_rollout"] == 0 for r in rows)
