"""Checkpoint and resume: a run stopped after a checkpoint and resumed equals an uninterrupted
run — same weights bit for bit, same metrics, same samples, same final evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import build_tiny_chat_model, build_tiny_reward_model
from trainer.config import PPOConfig
from trainer.ppo import Prompt, train_ppo

TIMING = ("time/", "tokens_per_s", "episodes_per_s")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    policy = build_tiny_chat_model(tmp_path / "policy")
    reward = build_tiny_reward_model(tmp_path / "reward")
    prompts = [Prompt(f"k{i}", [{"role": "user", "content": f"prompt {i}"}]) for i in range(10)]

    def run(out, steps, **kw):
        config = PPOConfig(
            policy=str(policy),
            reward=str(reward),
            out=str(out),
            steps=steps,
            batch_size=4,
            mini_batches=2,
            ppo_epochs=2,
            max_new_tokens=5,
            lr=1e-3,
            target_kl=1.0,  # the adaptive controller's state must survive the restart too
            eval_every=1,
            eval_fraction=0.2,
            plot_every=0,
            progress=False,
            **kw,
        )
        return train_ppo(config, prompts=prompts, log=None)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2, save_every=2)
    assert (tmp_path / "split" / "checkpoint" / "state.pt").is_file()
    resumed = run(tmp_path / "split", 4, save_every=2, resume=True)

    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "whole" / "metrics.jsonl") == _rows(
        tmp_path / "split" / "metrics.jsonl"
    )
    samples = [(tmp_path / d / "samples.jsonl").read_text() for d in ("whole", "split")]
    assert samples[0] == samples[1]
    assert whole["eval"] == resumed["eval"]
    assert whole["final_kl_coef"] == resumed["final_kl_coef"]
