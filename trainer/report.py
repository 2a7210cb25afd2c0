"""Run-directory reports: ``metrics.jsonl`` (one JSON object per logged step) and plots.

Plots use matplotlib's Agg backend (no display needed). Records with ``loss``/``accuracy`` are
training steps; records with ``eval_loss``/``eval_accuracy`` are held-out evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class MetricsWriter:
    """Appends one JSON line per record to ``path`` (flushed per line, so a killed run keeps
    what it logged)."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(
    history: Sequence[dict], path: str | Path, *, title: str = "reward model"
) -> Path:
    """Loss and accuracy over steps (training steps smoothed, held-out points on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    window = max(1, len(steps) // 20)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps:
        x = [h["step"] for h in steps]
        ax_loss.plot(x, [h["loss"] for h in steps], alpha=0.25, color="C0")
        ax_loss.plot(x, _smooth([h["loss"] for h in steps], window), color="C0", label="train")
        ax_acc.plot(x, [h["accuracy"] for h in steps], alpha=0.25, color="C0")
        ax_acc.plot(
            x, _smooth([h["accuracy"] for h in steps], window), color="C0", label="train batch"
        )
    if evals:
        x = [h["step"] for h in evals]
        ax_loss.plot(x, [h["eval_loss"] for h in evals], "o-", color="C1", label="held-out")
        ax_acc.plot(x, [h["eval_accuracy"] for h in evals], "o-", color="C1", label="held-out")
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    ax_acc.set(xlabel="step", ylabel="pairwise accuracy", title=f"{title}: accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
