"""Reward model from rankings: the K-way loss, training, evaluation, normalisation, scoring.

The loss is InstructGPT's: a ranking of K completions is ONE batch element; each completion is
scored once (K forward rows) and the element's loss is the mean over its C(K,2) ordered pairs
of ``−log σ(r_w − r_l − margin)`` (tied pairs dropped; margin = ``margin_scale`` × the
export's margin, 0 by default). The batch loss is the mean over its rankings.

Stages of :func:`train_reward`:

1. read the source, split by prompt (and by annotator), tokenise (left truncation, counted);
2. load the backbone as a one-output classifier (distinct pad token, head std 1/√(d+1));
3. plain loop: length-grouped batches → forward → K-way loss → clip → AdamW → cosine LR;
   checkpoints to ``out/checkpoint`` and ``--resume`` from them;
4. evaluate on the held-out split(s) (:func:`evaluate`);
5. normalise: bias = −mean raw reward over the training completions;
6. save the model, tokenizer, ``prefero_reward.json``, ``metrics.json`` and ``training.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import data as D
from trainer.config import RewardConfig
from trainer.models import load_reward_backbone, resolve_model
from trainer.report import MetricsWriter, plot_training

FORMAT = "prefero-reward/1"
META_FILE = "prefero_reward.json"
CHECKPOINT = "checkpoint"


# --------------------------------------------------------------------------------------------
# Loss


def kway_loss(
    rewards: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    margins: torch.Tensor,
    owner: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """Mean over rankings of the mean over each ranking's pairs of −log σ(r_w − r_l − m).

    ``rewards``: one score per forward row; ``winners``/``losers``: row indices of each pair;
    ``owner``: the ranking (0 … n−1) each pair belongs to.
    """
    losses = -F.logsigmoid(rewards[winners] - rewards[losers] - margins)
    per_ranking = torch.zeros(n, dtype=losses.dtype, device=losses.device)
    per_ranking = per_ranking.index_add(0, owner, losses)
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(losses.dtype)
    return (per_ranking / counts).mean()


def forward_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One score per row, read at the last non-pad token (positions follow the mask, so left
    and right padding give the same scores)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.logits.squeeze(-1).float()


# --------------------------------------------------------------------------------------------
# Preparing the data


def prepare_data(
    config: RewardConfig,
    tokenizer,
    *,
    test_size: int | None = None,
    comparisons: tuple[list[D.Comparison], list[D.Comparison]] | None = None,
):
    """Read, split and tokenise → (dataset, split, encoded train/test/test_annotators, info).

    ``comparisons`` = (train, test) skips reading and splitting (the benchmark gives prefero
    and TRL the very same split)."""
    if comparisons is not None:
        train_c, test_c = comparisons
        dataset = D.Dataset(
            [*train_c, *test_c], "given", config.data, rows=len(train_c) + len(test_c)
        )
        split = D.Split(list(train_c), list(test_c), [], [])
    else:
        dataset = D.load_source(config.data, token=config.token)
        split = D.split_comparisons(
            dataset.comparisons,
            eval_fraction=config.eval_fraction,
            seed=config.split_seed,
            test_size=test_size,
        )
    train = D.encode_comparisons(tokenizer, split.train, config.max_length)
    test = D.encode_comparisons(tokenizer, split.test, config.max_length)
    test_ann = D.encode_comparisons(tokenizer, split.test_annotators, config.max_length)
    truncated = sum(e.truncated for e in (*train, *test, *test_ann))
    info = {
        "kind": dataset.kind,
        "rows": dataset.rows,
        "comparisons": len(dataset.comparisons),
        "train_rankings": len(train),
        "train_pairs": sum(len(e.comparison.pairs) for e in train),
        "test_rankings": len(test),
        "test_annotator_rankings": len(test_ann),
        "heldout_annotators": split.heldout_annotators,
        "unused_by_heldout_annotators": split.unused,
        "ties_dropped": dataset.ties_dropped,
        "no_strict_pair": dataset.no_strict_pair,
        "truncated_rankings": truncated,
        "dropped_pairs": 0,
    }
    return dataset, split, (train, test, test_ann), info


# --------------------------------------------------------------------------------------------
# Training


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def effective_max_length(config: RewardConfig, model) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(config.max_length, limit) if limit else config.max_length


def plan_batches(encoded: Sequence[D.Encoded], config: RewardConfig) -> list[list[int]]:
    """Every step's ranking indices for the whole run (deterministic in the seed, so a resumed
    run replays the same plan)."""
    lengths = [e.length for e in encoded]
    epochs = max(1, math.ceil(config.epochs))
    plan: list[list[int]] = []
    per_epoch = math.ceil(len(encoded) / config.batch_size)
    for epoch in range(epochs):
        plan.extend(
            D.length_grouped_batches(
                lengths,
                config.batch_size,
                seed=config.seed * 1000 + epoch,
                group=config.length_grouping,
            )
        )
    total = max(1, round(per_epoch * config.epochs))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return plan[:total]


def _scheduler(optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _apply_lora(model, config: RewardConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    return get_peft_model(model, lora)


def _accelerator(config: RewardConfig):
    from accelerate import Accelerator

    return Accelerator(cpu=config.cpu or not torch.cuda.is_available())


def train_reward(
    config: RewardConfig,
    *,
    test_size: int | None = None,
    comparisons: tuple[list[D.Comparison], list[D.Comparison]] | None = None,
    stop_after_steps: int | None = None,
    log=print,
) -> dict:
    """Train, evaluate, normalise and save a reward model into ``config.out`` → metrics.

    ``stop_after_steps`` stops the loop early as if the run were killed (tests of
    ``--resume``); ``test_size`` asks for an exact number of held-out comparisons;
    ``comparisons`` = (train, test) replaces reading and splitting ``config.data``.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config)
    _set_seed(config.seed)
    base_path = resolve_model(config.model)
    model, tokenizer = load_reward_backbone(base_path, seed=config.seed)
    config = dataclasses.replace(config, max_length=effective_max_length(config, model))
    _, _, (train, test, test_ann), info = prepare_data(
        config, tokenizer, test_size=test_size, comparisons=comparisons
    )
    if not train:
        raise D.DataError(f"{config.data}: no training comparisons with a strict preference")
    log(
        f"data: {info['kind']} · {info['train_rankings']} train rankings "
        f"({info['train_pairs']} pairs) · {info['test_rankings']} test · "
        f"{info['truncated_rankings']} truncated from the left · {info['ties_dropped']} tied "
        f"pairs dropped · {info['no_strict_pair']} judgements without a strict pair"
    )
    if config.lora:
        model = _apply_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    plan = plan_batches(train, config)
    total = len(plan)
    scheduler = _scheduler(optimizer, total, int(config.warmup_ratio * total))
    # The scheduler stays ours: every process steps it once per step (each process takes its
    # share of the step's rankings, so accelerate's "one step per process" does not apply).
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    pad_id = tokenizer.pad_token_id

    start, history = 0, []
    ckpt = out / CHECKPOINT
    if config.resume and (ckpt / "state.pt").is_file():
        start, history = _load_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
        log(f"resumed from {ckpt} at step {start}/{total}")
    writer = MetricsWriter(out / "metrics.jsonl")
    for record in history:  # a resumed run's log = the checkpoint's history, then new steps
        writer.write(record)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=start,
        desc="reward",
        disable=not (config.progress and accelerator.is_main_process),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    pairs_done, seconds = 0, 0.0
    model.train()
    for step in range(start, total):
        if stop_after_steps is not None and step >= stop_after_steps:
            break
        tick = time.perf_counter()
        share = [train[i] for i in plan[step][rank::world]] or [train[plan[step][0]]]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = correct = n_pairs = n_rows = n_tokens = 0.0
        for chunk in _micro_batches(share, config.micro_batch_size):
            batch = D.collate(chunk, pad_id, margin_scale=config.margin_scale)
            rewards = forward_rewards(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
            winners, losers = batch["winners"].to(device), batch["losers"].to(device)
            loss = kway_loss(
                rewards,
                winners,
                losers,
                batch["margins"].to(device),
                batch["owner"].to(device),
                batch["n"],
            )
            if config.center_rewards:
                loss = loss + config.center_rewards * rewards.pow(2).mean()
            weight = len(chunk) / len(share)  # the step's loss = the mean over its rankings
            accelerator.backward(loss * weight)
            loss_sum += loss.item() * weight
            with torch.no_grad():
                correct += (rewards[winners] > rewards[losers]).sum().item()
            n_pairs += len(winners)
            n_rows += batch["input_ids"].shape[0]
            n_tokens += batch["input_ids"].numel()
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        acc = correct / max(1, n_pairs)
        pairs_done += int(n_pairs)
        record = {
            "step": step + 1,
            "loss": loss_sum,
            "accuracy": acc,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "pairs": int(n_pairs),
            "rows": int(n_rows),
            "tokens": int(n_tokens),
        }
        history.append(record)
        if accelerator.is_main_process:
            writer.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{acc:.2f}")
        if config.eval_every and (step + 1) % config.eval_every == 0 and test:
            ev = evaluate(model, tokenizer, test, batch_size=config.batch_size, device=device)
            ev_record = {"step": step + 1, "eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"]}
            history.append(ev_record)
            if accelerator.is_main_process:
                writer.write(ev_record)
            model.train()
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(ckpt, accelerator, model, optimizer, scheduler, step + 1, history)
    bar.close()
    writer.close()
    finished = stop_after_steps is None or stop_after_steps >= total
    if not finished:
        return {"stopped_at": stop_after_steps}

    model = accelerator.unwrap_model(model)
    if config.lora:
        model = model.merge_and_unload()
    model.eval()
    metrics: dict = {
        "data": info,
        "train": {"steps": total, "pairs_per_s": _rate(pairs_done, seconds)},
    }
    if history:
        tail = [h for h in history if "loss" in h][-20:]
        metrics["train"]["final_loss"] = sum(h["loss"] for h in tail) / max(1, len(tail))
    eval_bs = max(config.batch_size, 8)
    if test:
        metrics["test"] = evaluate(model, tokenizer, test, batch_size=eval_bs, device=device)
    if test_ann:
        metrics["test_heldout_annotators"] = evaluate(
            model, tokenizer, test_ann, batch_size=eval_bs, device=device
        )
    normalisation = normalise(
        model,
        normalisation_sample(train, limit=config.normalise_samples, seed=config.seed),
        pad_id,
        batch_size=eval_bs,
        device=device,
    )
    if accelerator.is_main_process:
        _save(out, model, tokenizer, config, base_path, normalisation, metrics)
        plot_training(history, out / "training.png")
        if ckpt.exists():
            shutil.rmtree(ckpt)
    log(format_metrics(metrics))
    return metrics


def _micro_batches(share: list[D.Encoded], size: int | None) -> list[list[D.Encoded]]:
    """The step's rankings in forward passes of at most ``size`` rankings (all at once when
    None), grouped by length so each pass pads little; a ranking is never split."""
    if not size or size >= len(share):
        return [share]
    ordered = sorted(share, key=lambda e: e.length)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _save_checkpoint(path: Path, accelerator, model, optimizer, scheduler, step, history) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    torch.save(
        {
            "step": step,
            "model": {k: v for k, v in unwrapped.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "state.pt",
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, accelerator, model, optimizer, scheduler):
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["history"]


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def score_encoded(model, encoded: Sequence[D.Encoded], pad_id: int, *, batch_size: int, device):
    """Raw scores of every completion of ``encoded`` → list (per comparison) of tensors."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
    result: list[torch.Tensor | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = D.collate([encoded[i] for i in idx], pad_id)
        rewards = forward_rewards(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        ).cpu()
        offset = 0
        for i in idx:
            k = len(encoded[i].rows)
            result[i] = rewards[offset : offset + k]
            offset += k
    model.train(was_training)
    return result


def kendall_tau(ranks: Sequence[int], scores: Sequence[float]) -> float | None:
    """Kendall τ-b between human group ranks (0 = best) and model scores (higher = better)."""
    n = len(ranks)
    concordant = discordant = tie_h = tie_m = 0
    for i in range(n):
        for j in range(i + 1, n):
            h = ranks[j] - ranks[i]  # > 0 when i is ranked better
            m = scores[i] - scores[j]
            if h == 0 and m == 0:
                continue
            if h == 0:
                tie_h += 1
            elif m == 0:
                tie_m += 1
            elif (h > 0) == (m > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + tie_h) * (concordant + discordant + tie_m))
    return (concordant - discordant) / denom if denom else None


def expected_calibration_error(diffs: Sequence[float], bins: int = 10) -> float:
    """ECE of σ(r_w − r_l) read as a binary classifier (confidence max(p, 1 − p), correct when
    p > ½), over ``bins`` equal-width confidence bins."""
    if not diffs:
        return 0.0
    totals: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for d in diffs:
        p = 1.0 / (1.0 + math.exp(-max(min(d, 60.0), -60.0)))
        confidence = max(p, 1.0 - p)
        b = min(bins - 1, int((confidence - 0.5) * 2 * bins))
        cell = totals[b]
        cell[0] += 1
        cell[1] += confidence
        cell[2] += 1.0 if p > 0.5 else 0.0
    n = len(diffs)
    return sum(abs(c[2] - c[1]) for c in totals.values()) / n


def _length_bucket(tokens: int) -> str:
    edges = [64, 128, 256, 512, 1024]
    low = 0
    for edge in edges:
        if tokens < edge:
            return f"{low}-{edge - 1}"
        low = edge
    return f"{low}+"


def metrics_from_scores(
    encoded: Sequence[D.Encoded], scores: Sequence[torch.Tensor], *, margin_scale: float = 0.0
) -> dict:
    """Pairwise accuracy (strict: r_w > r_l; ties apart), loss, Kendall τ, ECE, accuracy by K
    and by prompt length (tokens of the longest scored row)."""
    correct = ties = total = 0
    diffs: list[float] = []
    losses: list[float] = []
    taus: list[float] = []
    by_k: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    by_len: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e, s in zip(encoded, scores, strict=True):
        c = e.comparison
        values = s.tolist()
        pair_losses = []
        for w, lo, m in c.pairs:
            d = values[w] - values[lo]
            diffs.append(d)
            total += 1
            ok = d > 0
            correct += ok
            ties += d == 0
            by_k[c.k][0] += ok
            by_k[c.k][1] += 1
            bucket = _length_bucket(e.length)
            by_len[bucket][0] += ok
            by_len[bucket][1] += 1
            pair_losses.append(-F.logsigmoid(torch.tensor(d - m * margin_scale)).item())
        if pair_losses:
            losses.append(sum(pair_losses) / len(pair_losses))
        if c.ranks and len(set(c.ranks)) > 1:
            tau = kendall_tau(c.ranks, values)
            if tau is not None:
                taus.append(tau)
    return {
        "rankings": len(encoded),
        "pairs": total,
        "accuracy": correct / total if total else 0.0,
        "tie_rate": ties / total if total else 0.0,
        "loss": sum(losses) / len(losses) if losses else 0.0,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "ece": expected_calibration_error(diffs),
        "accuracy_by_k": {str(k): v[0] / v[1] for k, v in sorted(by_k.items())},
        "pairs_by_k": {str(k): v[1] for k, v in sorted(by_k.items())},
        "accuracy_by_length": {b: v[0] / v[1] for b, v in sorted(by_len.items(), key=_bucket_key)},
        "pairs_by_length": {b: v[1] for b, v in sorted(by_len.items(), key=_bucket_key)},
        "truncated_rankings": sum(e.truncated for e in encoded),
    }


def _bucket_key(item) -> int:
    return int(item[0].split("-")[0].rstrip("+"))


def evaluate(model, tokenizer, encoded, *, batch_size: int, device, margin_scale: float = 0.0):
    scores = score_encoded(
        model, encoded, tokenizer.pad_token_id, batch_size=batch_size, device=device
    )
    return metrics_from_scores(encoded, scores, margin_scale=margin_scale)


def normalisation_sample(encoded: Sequence[D.Encoded], *, limit: int, seed: int) -> list:
    """Whole rankings, in a seeded random order, until about ``limit`` completions (all of
    them when ``limit`` is 0 or they are fewer)."""
    total = sum(len(e.rows) for e in encoded)
    if limit <= 0 or total <= limit:
        return list(encoded)
    g = torch.Generator().manual_seed(seed)
    chosen, n = [], 0
    for i in torch.randperm(len(encoded), generator=g).tolist():
        if n >= limit:
            break
        chosen.append(encoded[i])
        n += len(encoded[i].rows)
    return chosen


def normalise(model, encoded, pad_id: int, *, batch_size: int, device) -> dict:
    """bias = −(mean raw reward over the training completions); the std is recorded."""
    scores = score_encoded(model, encoded, pad_id, batch_size=batch_size, device=device)
    flat = torch.cat([s for s in scores if s is not None]) if scores else torch.zeros(1)
    mean = float(flat.mean())
    std = float(flat.std()) if flat.numel() > 1 else 0.0
    return {"bias": -mean, "raw_mean": mean, "std": std, "completions": int(flat.numel())}


def format_metrics(metrics: dict) -> str:
    lines = []
    for name in ("test", "test_heldout_annotators"):
        m = metrics.get(name)
        if not m:
            continue
        tau = "n/a" if m["kendall_tau"] is None else f"{m['kendall_tau']:.3f}"
        lines.append(
            f"{name}: accuracy {m['accuracy']:.3f} (ties {m['tie_rate']:.3f}) over "
            f"{m['pairs']} pairs / {m['rankings']} rankings · loss {m['loss']:.4f} · "
            f"Kendall τ {tau} · ECE {m['ece']:.3f}"
        )
        lines.append(
            "  by K: "
            + ", ".join(
                f"K={k} {v:.3f} ({m['pairs_by_k'][k]})" for k, v in m["accuracy_by_k"].items()
            )
        )
        lines.append(
            "  by length (tokens): "
            + ", ".join(
                f"{b} {v:.3f} ({m['pairs_by_length'][b]})"
                for b, v in m["accuracy_by_length"].items()
            )
        )
    train = metrics.get("train", {})
    if train:
        lines.append(f"train: {train['steps']} steps · {train['pairs_per_s']:.1f} pairs/s")
    return "\n".join(lines) if lines else "no held-out data: nothing evaluated"


# --------------------------------------------------------------------------------------------
# Saving and loading


def _save(out: Path, model, tokenizer, config, base_path, normalisation, metrics) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = dataclasses.asdict(config)
    cfg.pop("token", None)
    meta = {
        "format": FORMAT,
        "normalisation": normalisation,
        "max_length": config.max_length,
        "base_model": config.model,
        "base_model_path": str(base_path),
        "lora": config.lora,
        "source": _redact(config.data),
        "config": cfg,
        "metrics": metrics,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")


def _redact(source: str) -> str:
    """A source URL without its query secrets (tokens never travel in the URL, but be safe)."""
    return source.split("#", 1)[0]


class RewardModel:
    """A trained reward model: ``score(messages_list, responses)`` → normalised rewards."""

    def __init__(self, model, tokenizer, meta: dict, device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.max_length = int(meta.get("max_length", 512))
        self.bias = normalisation_bias(meta)

    def text(self, messages: D.Messages, response: str) -> str:
        return D.reward_input_text(self.tokenizer, messages, response)

    @torch.no_grad()
    def score_raw(self, messages_list, responses, *, batch_size: int = 16) -> torch.Tensor:
        rows = [
            D.encode(self.tokenizer, self.text(D.as_messages(m), r), self.max_length)[0]
            for m, r in zip(messages_list, responses, strict=True)
        ]
        encoded = [D.Encoded(D.Comparison([], [""], [], ""), [ids], False) for ids in rows]
        scores = score_encoded(
            self.model,
            encoded,
            self.tokenizer.pad_token_id,
            batch_size=batch_size,
            device=self.device,
        )
        if not scores:
            return torch.zeros(0)
        return torch.cat(scores)

    def score(self, messages_list, responses, *, batch_size: int = 16) -> torch.Tensor:
        """Normalised rewards (raw score + bias) of each response to its prompt messages."""
        return self.score_raw(messages_list, responses, batch_size=batch_size) + self.bias


def read_meta(directory: str | Path) -> dict:
    """The ``prefero_reward.json`` of a ``prefero-train reward`` output directory
    (:class:`~trainer.data.DataError` when the directory is not one)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise D.DataError(f"{directory}: not a prefero reward model (no {META_FILE})")
    meta = json.loads(meta_path.read_text("utf-8"))
    if meta.get("format") != FORMAT:
        raise D.DataError(f"{directory}: unsupported reward format {meta.get('format')!r}")
    return meta


def normalisation_bias(meta: dict) -> float:
    """The bias added to the raw score (0 when the metadata records none)."""
    return float(meta.get("normalisation", {}).get("bias", 0.0))


def load_reward_model(directory: str | Path, *, device=None, dtype=None) -> RewardModel:
    """Load a ``prefero-train reward`` output directory for scoring (eval mode, no grad)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    meta = read_meta(directory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=dtype or torch.float32
    ).to(device)
    model.eval()
    return RewardModel(model, tokenizer, meta, device)


def score_file(
    model_dir: str | Path,
    source: str,
    *,
    out: str | Path | None = None,
    token: str | None = None,
    batch_size: int = 16,
    log=print,
) -> dict:
    """``prefero-train score``: completion rows get a reward each; pairs, rankings and HH-RLHF
    data are evaluated (accuracy, tie rate, count). With ``out``, writes JSONL results."""
    rm = load_reward_model(model_dir)
    rows = list(D.read_rows(source, token=token))
    if not rows:
        raise D.DataError(f"{source}: no rows")
    kind = D.detect_kind(rows[0])
    if kind == "completions":
        messages = [D.as_messages(r["prompt"]) for r in rows]
        texts = [D.as_text(r.get("completion", r.get("response", r.get("text", "")))) for r in rows]
        rewards = rm.score(messages, texts, batch_size=batch_size).tolist()
        summary = {
            "kind": kind,
            "scored": len(rows),
            "mean_reward": sum(rewards) / len(rewards),
        }
        if out:
            with open(out, "w", encoding="utf-8") as fh:
                for row, reward in zip(rows, rewards, strict=True):
                    fh.write(json.dumps({**row, "reward": reward}, ensure_ascii=False) + "\n")
        log(f"scored {len(rows)} completions · mean reward {summary['mean_reward']:.4f}")
        return summary
    builder = {"rankings": D.comparisons_from_rankings, "pairs": D.comparisons_from_pairs}.get(
        kind, D.comparisons_from_hh
    )
    dataset = builder(rows)
    encoded = D.encode_comparisons(rm.tokenizer, dataset.comparisons, rm.max_length)
    scores = score_encoded(
        rm.model, encoded, rm.tokenizer.pad_token_id, batch_size=batch_size, device=rm.device
    )
    metrics = metrics_from_scores(encoded, scores)
    summary = {
        "kind": kind,
        "scored": metrics["pairs"],
        "accuracy": metrics["accuracy"],
        "tie_rate": metrics["tie_rate"],
        "ties_dropped": dataset.ties_dropped,
        "metrics": metrics,
    }
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            for e, s in zip(encoded, scores, strict=True):
                values = (s + rm.bias).tolist()
                for w, lo, m in e.comparison.pairs:
                    record = {
                        "group": e.comparison.group,
                        "prompt": e.comparison.prompt,
                        "chosen": e.comparison.completions[w],
                        "rejected": e.comparison.completions[lo],
                        "margin": m,
                        "reward_chosen": values[w],
                        "reward_rejected": values[lo],
                    }
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    log(
        f"scored {metrics['pairs']} pairs ({metrics['rankings']} {kind} groups): accuracy "
        f"{metrics['accuracy']:.4f} · tie rate {metrics['tie_rate']:.4f}"
        + (f" · {dataset.ties_dropped} tied pairs skipped" if dataset.ties_dropped else "")
    )
    return summary
