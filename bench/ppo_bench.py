"""PPO benchmark: the built-in SmolLM2-135M policy against a prefero reward model.

Run from the repository root with the project's virtual environment active::

    python bench/ppo_bench.py                         # trains the reward model, then PPO
    python bench/ppo_bench.py --reward DIR            # reuse a `prefero-train reward` model
    python bench/ppo_bench.py --steps 4 --json ppo.json --plot docs/img/ppo_bench.png
    python bench/ppo_bench.py --reward DIR --configs issue --max-new-tokens 128 \
        --value-warmup-steps 3                        # a longer budget, value warm-up first

1. Reward model: ``prefero-train reward`` on ``../shared/data/hh-harmless-1800.jsonl.gz`` with
   SmolLM2-135M-Instruct as the backbone (``--rm-steps`` optimiser steps of 8 pairs, max length
   256), unless ``--reward`` names one.
2. PPO, "issue" config: 16 prompts per rollout, 48 new tokens, 4 mini-batches × 4 PPO epochs,
   ``--steps`` updates, prompts from the same HH file (its held-out split never trains).
3. PPO, "small" config: 4 prompts per rollout, 16 new tokens, 1 mini-batch × 2 epochs.

Reported per config: episodes/s, generated tokens/s, the share of a step spent in generation /
scoring / log-prob and value forward passes / the PPO update, the score of the first and the
last rollouts, KL, and the held-out evaluation (tuned policy vs. reference under the reward
model: mean reward, win rate, KL).

Goals (exit status 1 when one fails): generation ≤ 60 % of the step time in the issue config
(batched sampling with a KV cache); the held-out reward gain ≥ 0 with KL ≤ 10 nats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.config import PPOConfig, RewardConfig  # noqa: E402
from trainer.ppo import train_ppo  # noqa: E402
from trainer.reward import train_reward  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-harmless-1800.jsonl.gz"
CONFIGS = {
    "issue": dict(batch_size=16, max_new_tokens=48, mini_batches=4, ppo_epochs=4),
    "small": dict(batch_size=4, max_new_tokens=16, mini_batches=1, ppo_epochs=2),
}


def overrides(args: argparse.Namespace, name: str) -> dict:
    """The issue config's settings changed on the command line (``--max-new-tokens``)."""
    if name == "issue" and args.max_new_tokens is not None:
        return {"max_new_tokens": args.max_new_tokens}
    return {}


def train_reward_model(out: Path, steps: int) -> Path:
    t0 = time.perf_counter()
    train_reward(
        RewardConfig(
            data=str(DATA),
            model="smollm2-135m-instruct",
            out=str(out),
            max_steps=steps,
            batch_size=8,
            max_length=256,
            progress=False,
        ),
        log=lambda *_: None,
    )
    print(f"reward model: {steps} steps in {time.perf_counter() - t0:.0f} s → {out}")
    return out


def run_ppo(name: str, reward: Path, out: Path, args) -> dict:
    config = PPOConfig(
        policy="smollm2-135m-instruct",
        reward=str(reward),
        prompts=str(DATA),
        out=str(out),
        steps=args.steps,
        max_prompt_tokens=128,
        lr=args.lr,
        eval_every=0,
        eval_max=args.eval_prompts,
        plot_every=0,
        progress=False,
        seed=args.seed,
        value_warmup_steps=args.value_warmup_steps,
        **{**CONFIGS[name], **overrides(args, name)},
    )
    t0 = time.perf_counter()
    result = train_ppo(config, log=None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1 includes one-off warm-up (allocations, first kernels): timings from step 2 on.
    timed = rows[1:] or rows
    step_time = statistics.fmean(r["time/step"] for r in timed)
    share = {
        part: statistics.fmean(r.get(f"time/{part}", 0.0) / r["time/step"] for r in timed)
        for part in ("generation", "scoring", "forward", "update")
    }
    half = max(1, len(rows) // 2)
    figures = {
        "config": name,
        **CONFIGS[name],
        **overrides(args, name),
        "value_warmup_steps": args.value_warmup_steps,
        "steps": len(rows),
        "wall_s": wall,
        "step_s": step_time,
        "episodes_per_s": statistics.fmean(r["episodes_per_s"] for r in timed),
        "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in timed),
        "share": share,
        "score_first_half": statistics.fmean(r["objective/scores"] for r in rows[:half]),
        "score_second_half": statistics.fmean(r["objective/scores"] for r in rows[half:]),
        "kl_last": rows[-1]["objective/kl"],
        "explained_variance_first_half": statistics.fmean(
            r["val/explained_variance"] for r in rows[:half]
        ),
        "explained_variance_second_half": statistics.fmean(
            r["val/explained_variance"] for r in rows[half:]
        ),
        "value_init": result["value_init"],
        "eos_fraction_last": rows[-1]["val/eos_fraction"],
        "eval": result["eval"],
    }
    return figures


def report(f: dict) -> None:
    e = f["eval"]
    s = f["share"]
    print(
        f"\n[{f['config']}] {f['batch_size']} prompts × {f['max_new_tokens']} new tokens, "
        f"{f['mini_batches']} mini-batches × {f['ppo_epochs']} epochs, {f['steps']} updates "
        f"({f['wall_s']:.0f} s)\n"
        f"  step {f['step_s']:.1f} s · {f['episodes_per_s']:.2f} episodes/s · "
        f"{f['tokens_per_s']:.1f} generated tokens/s\n"
        f"  time split: generation {s['generation']:.0%} · scoring {s['scoring']:.0%} · "
        f"forward passes {s['forward']:.0%} · update {s['update']:.0%}\n"
        f"  score: first half {f['score_first_half']:+.3f} → second half "
        f"{f['score_second_half']:+.3f} · KL {f['kl_last']:.2f} nats · EOS "
        f"{f['eos_fraction_last']:.0%}\n"
        f"  value model from the {f['value_init']}, {f['value_warmup_steps']} warm-up "
        "updates (policy frozen) · explained variance: first half "
        f"{f['explained_variance_first_half']:+.2f} → second half "
        f"{f['explained_variance_second_half']:+.2f}"
    )
    if e.get("prompts"):
        print(
            f"  held-out ({e['prompts']} prompts): reward {e['policy_reward']:+.3f} vs reference "
            f"{e['reference_reward']:+.3f} (gain {e['reward_gain']:+.3f}), win rate "
            f"{e['win_rate']:.2f}, KL {e['kl']:.2f} nats\n"
            f"    ended with EOS: policy {e['policy_eos_fraction']:.0%}, reference "
            f"{e['reference_eos_fraction']:.0%}\n"
            f"    reward model score without the no-EOS penalty: {e['raw_policy_reward']:+.3f} vs "
            f"{e['raw_reference_reward']:+.3f} (gain {e['raw_reward_gain']:+.3f}), win rate "
            f"{e['raw_win_rate']:.2f}\n"
            f"    prompts where both ended ({e['finished_prompts']}): "
            f"{e['finished_policy_reward']:+.3f}"
            f" vs {e['finished_reference_reward']:+.3f} (gain {e['finished_reward_gain']:+.3f}), "
            f"win rate {e['finished_win_rate']:.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", type=Path, default=None, help="reuse this reward model")
    parser.add_argument("--rm-steps", type=int, default=80, help="reward-model training steps")
    parser.add_argument("--steps", type=int, default=8, help="PPO updates per config")
    parser.add_argument("--lr", type=float, default=PPOConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--configs", default="issue,small")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="the issue config's response budget instead of its 48 tokens",
    )
    parser.add_argument(
        "--value-warmup-steps",
        type=int,
        default=0,
        help="first updates that train only the value model (0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is much faster on a machine shared with other "
        "busy processes, where spinning OpenMP threads get descheduled)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="copy the issue run's plot")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.is_file():
        print(f"missing {DATA}", file=sys.stderr)
        return 2
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs · torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    try:
        reward = args.reward or train_reward_model(work / "rm", args.rm_steps)
        results = []
        for name in args.configs.split(","):
            out = (args.keep or work) / f"ppo-{name}"
            shutil.rmtree(out, ignore_errors=True)
            figures = run_ppo(name, reward, out, args)
            report(figures)
            results.append(figures)
            if name == "issue" and args.plot:
                args.plot.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "training.png", args.plot)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failures = []
    for f in results:
        if f["config"] == "issue" and f["share"]["generation"] > 0.60:
            failures.append(f"generation is {f['share']['generation']:.0%} of the step (> 60 %)")
        e = f["eval"]
        if e.get("prompts") and (e["reward_gain"] < 0 or e["kl"] > 10):
            failures.append(
                f"[{f['config']}] held-out gain {e['reward_gain']:+.3f}, KL {e['kl']:.2f}"
            )
    for failure in failures:
        print(f"GOAL MISSED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
