"""Pure tensor helpers of PPO: masked statistics, log-probabilities, GAE, KL controllers.

Every function here is a pure function of its tensor arguments (no model, no global state), so
each is unit-tested against a hand-computed example in ``tests/trainer/test_ops.py``.

Shapes: ``(batch, T)`` over the response tokens; ``mask`` is 1 for real response tokens (up to
and including the EOS token) and 0 for the padding after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INVALID_LOGPROB = 1.0
"""Log-probability written at padding positions (a real log-probability is ≤ 0, so a padding
value that leaked into a sum would be visible)."""


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set (over ``dim``, or everything)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set (over ``dim``, or everything).

    An empty mask gives 0, never NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x − mean) / std`` over the masked positions; with ``shift_mean=False`` the mean is
    added back (scale only). Positions outside the mask are set to 0."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(labels)`` under ``logits``: ``(B, T, V), (B, T) → (B, T)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: ``(B, T, V) → (B, T)``."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(π ‖ π_ref): ``log π − log π_ref`` at the sampled tokens.

    Unbiased for the sequence KL when the tokens are sampled from π; it can be negative for
    one token (never in expectation)."""
    return logprobs - ref_logprobs


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or its length when there is none."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, length)).min(-1).values


def response_mask(responses: torch.Tensor, eos_ids: list[int] | set[int]) -> torch.Tensor:
    """``(mask, has_eos)`` for generated ``responses``: the mask covers every token up to and
    including the first EOS (all tokens when there is none)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for token in eos_ids:
        is_eos |= responses == token
    first = first_true_index(is_eos)
    positions = torch.arange(responses.shape[-1], device=responses.device)
    mask = positions.unsqueeze(0) <= first.unsqueeze(-1)
    return mask, first < responses.shape[-1]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens → ``(advantages, returns)``.

    ``δ_t = r_t + gamma·V_{t+1} − V_t`` and ``A_t = δ_t + gamma·λ·A_{t+1}``, with ``V`` and
    ``A`` equal to 0 after the last real token (the episode ends at EOS). ``returns = A + V``
    are the value targets. Padding positions get 0 for both.
    """
    maskf = mask.to(rewards.dtype)
    rewards = rewards * maskf
    values = values * maskf
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * maskf[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * maskf
    return advantages, returns


def explained_variance(
    predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> float:
    """``1 − Var(targets − predictions) / Var(targets)`` over the mask (1 = perfect value
    function, 0 = no better than a constant, negative = worse). NaN when the targets have no
    variance."""
    var_targets = masked_var(targets, mask, unbiased=False)
    if var_targets.item() == 0.0:
        return math.nan
    return float(1.0 - masked_var(targets - predictions, mask, unbiased=False) / var_targets)


@dataclass
class FixedKLController:
    """A constant KL coefficient β."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed controller never changes β."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """The proportional controller of Ziegler et al. (2019): after each rollout,
    ``β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n_steps / horizon)``, so β rises while the
    measured KL is above the target and falls while it is below."""

    value: float
    target: float
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β towards the value that keeps ``current_kl`` (the mean sequence KL of a
        rollout) at the target; ``n_steps`` is the number of episodes in that rollout."""
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(
    kl_coef: float, target_kl: float | None, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when a target KL is given, else a fixed β."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    if target_kl <= 0:
        raise ValueError("target_kl must be positive")
    return AdaptiveKLController(kl_coef, target_kl, horizon)
