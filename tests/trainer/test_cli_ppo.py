"""``prefero-train ppo`` end to end with a tiny budget: the run directory and the policy."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import build_tiny_chat_model, build_tiny_reward_model
from trainer.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_ppo_writes_a_run_directory_and_a_loadable_policy(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    policy = build_tiny_chat_model(tmp_path / "policy")
    reward = build_tiny_reward_model(tmp_path / "reward")
    prompts = tmp_path / "pairs.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Write poem {i} about the sea.", "chosen": "a", "rejected": "b"})
            + "\n"
            for i in range(12)
        )
    )
    out = tmp_path / "run"
    code = main(
        [
            "ppo",
            "--policy", str(policy),
            "--reward", str(reward),
            "--prompts", str(prompts),
            "--out", str(out),
            "--steps", "3",
            "--batch-size", "4",
            "--mini-batches", "2",
            "--ppo-epochs", "1",
            "--max-new-tokens", "5",
            "--eval-every", "2",
            "--eval-fraction", "0.25",
            "--no-eos-penalty", "-2",
            "--target-kl", "4",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("objective/scores", "objective/kl", "policy/approx_kl", "val/eos_fraction"):
        assert key in rows[-1]
    assert (out / "training.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 2, 3]
    assert all(isinstance(s["response"], str) and "score" in s for s in samples)
    evaluation = json.loads((out / "eval.json").read_text())
    meta = json.loads((out / "prefero_ppo.json").read_text())
    assert evaluation["prompts"] == meta["held_out_prompts"] >= 1
    assert meta["train_prompts"] + meta["held_out_prompts"] == 12
    assert 0.0 <= evaluation["win_rate"] <= 1.0
    assert meta["format"] == "prefero-ppo/1"
    assert meta["config"]["no_eos_penalty"] == -2.0
    assert meta["config"]["target_kl"] == 4.0
    # The policy loads like any Hugging Face model, with its chat template and generation config.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    assert tokenizer.padding_side == "right"
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(policy)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert "held-out evaluation (" in capsys.readouterr().out


def test_cli_ppo_reports_bad_input(tmp_path, capsys):
    policy = build_tiny_chat_model(tmp_path / "policy")
    reward = build_tiny_reward_model(tmp_path / "reward")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"nothing": 1}\n')
    args = ["ppo", "--policy", str(policy), "--reward", str(reward), "--out", str(tmp_path / "o")]
    assert main([*args, "--prompts", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main([*args, "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(SystemExit):
        main([*args, "--prompts", str(empty), "--no-eos-penalty", "lots"])


def test_every_ppo_config_field_has_an_option_and_every_option_is_documented():
    import argparse
    import dataclasses
    from pathlib import Path

    from trainer.cli import build_parser
    from trainer.config import PPOConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ppo = sub.choices["ppo"]
    dests = {a.dest for a in ppo._actions}
    missing = [f.name for f in dataclasses.fields(PPOConfig) if f.name not in dests]
    assert not missing, f"PPOConfig fields without a command-line option: {missing}"
    doc = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    section = doc[doc.index("## PPO") :]
    flags = [s for a in ppo._actions for s in a.option_strings if s.startswith("--")]
    undocumented = [f for f in flags if f not in ("--help",) and f"`{f}" not in section]
    assert not undocumented, (
        f"options missing from the PPO section of docs/trainer.md: {undocumented}"
    )
