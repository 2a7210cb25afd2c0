"""PPO against a prefero reward model: the InstructGPT recipe with its implementation details.

One PPO step, in numbered stages (each a method of :class:`PPOTrainer`):

1. **Prompts** — ``batch_size`` training prompts, in a seeded order that depends only on the
   step (so a resumed run draws the same prompts). Held-out prompts never train.
2. **Rollout** — sample responses with the policy (KV cache; temperature, top-p, max new
   tokens; stop at EOS). Prompts are left-padded; everything after the first EOS is padding.
3. **Score** — decode each response and score ``(prompt, response)`` with the reward model
   (its own tokenizer and chat template, its normalisation applied: decoding and re-encoding
   is what lets the policy and the reward model use different tokenizers). A response cut off
   before EOS gets the fixed penalty score instead (``no_eos_penalty``, default −1).
4. **Forward passes** — log-probabilities of the sampled tokens under the policy and the frozen
   reference (logits divided by the sampling temperature), per-token values from the value
   model, recomputed with a full forward pass (never taken from the generation loop).
5. **Rewards** — per-token KL penalty ``−β·(log π − log π_ref)`` (k1) plus the score on the
   last real token (the EOS token); GAE with gamma = 1, λ = 0.95 gives advantages and returns;
   advantages are whitened over the batch.
6. **Update** — ``ppo_epochs`` passes over ``mini_batches`` shuffled mini-batches: clipped
   policy loss (0.2), clipped value loss (0.2, coefficient 0.1), optional PPO-ptx language
   modelling loss, gradient clipping, one Adam step per mini-batch. A non-finite loss or
   gradient skips that mini-batch; a non-finite score or log-probability skips the whole step.
   Both are counted in ``guard/*`` metrics.
7. **Log** — metrics to ``metrics.jsonl``, the progress bar and ``training.png``; greedy samples
   for the fixed evaluation prompts to ``samples.jsonl``; checkpoints every ``save_every``.

Models: the trainable policy; the frozen reference (a copy, or the policy with its LoRA adapter
switched off); the frozen reward model (``trainer.reward.load_reward_model``); a separate value
model initialised from the reward model when it reads the policy's tokens (same vocabulary;
its normalisation folded into the head's bias, so its first values are normalised scores of
each prefix), else from the policy with a fresh one-output head. Dropout is off in all of them.

Everything random is seeded from ``(seed, step)``, so a run is bit-identical on the CPU for a
given seed and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer import data as D
from trainer import ops
from trainer.config import PPOConfig

FORMAT = "prefero-ppo/1"
CHECKPOINT_DIR = "checkpoint"
Messages = list[dict[str, str]]


class PPOError(D.DataError):
    """Bad input for a PPO run (no prompts, incompatible options, missing files); a
    ``DataError``, so the command line reports it as one."""


class Scorer(Protocol):
    """What PPO needs from a reward model: scores of (prompt messages, response text) pairs,
    normalisation applied (``trainer.reward.load_reward_model`` returns one)."""

    def score(
        self, messages_list: Sequence[Messages], responses: Sequence[str]
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt as chat messages, with the key that decides its side of the split."""

    key: str
    messages: Messages


def _prompt_messages(row: dict) -> Messages | None:
    """The prompt of an export row (``prompt``: text or messages) or of an HH-RLHF row
    (everything before the last ``Assistant:`` turn)."""
    prompt = row.get("prompt")
    if prompt is not None:
        messages = D.as_messages(prompt)
        text = messages[0]["content"] if len(messages) == 1 else ""
        if text.startswith(D.HH_HUMAN) or (
            text.startswith("Human:") and D.HH_ASSISTANT in text
        ):  # an HH-style transcript given as the prompt
            transcript = text if text.rstrip().endswith("Assistant:") else text + D.HH_ASSISTANT
            parsed, _ = D.split_hh("\n\n" + transcript.lstrip("\n"))
            messages = parsed or messages
        return messages if any(m["content"].strip() for m in messages) else None
    chosen = row.get("chosen")
    if isinstance(chosen, str) and D.HH_ASSISTANT in chosen:
        messages, _ = D.split_hh(chosen)
        return messages or None
    return None


def load_prompts(source: str, *, token: str | None = None) -> list[Prompt]:
    """The distinct prompts of a ``rankings``/``pairs`` export (JSONL, gzip JSONL or Parquet),
    an export URL, a JSONL of ``{"prompt"}`` rows or an HH-RLHF file, in first-seen order.

    The split key is the reward model's (the export's ``prompt_id`` when there is one, else
    the prompt itself), so with the same seed and fraction the reward model's held-out prompts
    are PPO's held-out prompts."""
    seen: dict[str, Prompt] = {}
    for row in D.read_rows(source, token=token):
        if not isinstance(row, dict):
            continue
        messages = _prompt_messages(row)
        if not messages:
            continue
        key = D.prompt_key_of(row, messages)
        if key not in seen:
            seen[key] = Prompt(key=key, messages=messages)
    if not seen:
        raise PPOError(f"no prompts in {source!r} (expected rows with a 'prompt')")
    return list(seen.values())


def split_prompts(
    prompts: Sequence[Prompt], *, fraction: float, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, held_out)``: a stable pseudo-random ``fraction`` of the keys is held out (the
    same draw as the service's ``split_of``: sha256 of seed and key). With a positive fraction
    and at least two prompts, at least one prompt is held out and at least one trains."""
    if not 0.0 <= fraction < 1.0:
        raise PPOError("eval_fraction must be in [0, 1)")
    draws = [(D.hash_fraction(p.key, seed=seed), p) for p in prompts]
    held = [p for u, p in draws if u < fraction]
    if fraction > 0 and not held and len(prompts) >= 2:
        held = [min(draws, key=lambda d: d[0])[1]]
    if len(held) == len(prompts):
        held = held[:-1]
    held_keys = {p.key for p in held}
    return [p for p in prompts if p.key not in held_keys], held


def load_ptx_texts(path: str, tokenizer) -> list[str]:
    """Texts for the PPO-ptx loss: a ``.txt`` file (one text per non-empty line) or JSONL rows
    with ``text``, or a prompt with a ``chosen``/``response`` completion (rendered with the
    policy's chat template)."""
    file = Path(path)
    if not file.is_file():
        raise PPOError(f"--ptx-data {path!r} is not a file")
    if file.suffix == ".txt":
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        return [t for t in texts if t]
    texts = []
    for row in D.read_rows(path):
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
            continue
        messages = _prompt_messages(row)
        answer = row.get("chosen", row.get("response"))
        if isinstance(answer, list) and answer:
            answer = answer[-1].get("content")
        if messages and isinstance(answer, str):
            if isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"]:
                answer = row["chosen"][row["chosen"].rfind("\n\nAssistant:") + 12 :].strip()
            texts.append(
                render_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}])
            )
    if not texts:
        raise PPOError(f"no texts in --ptx-data {path!r}")
    return texts


# -------------------------------------------------------------------------------- tokenising


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Messages, *, generation_prompt: bool = False) -> str:
    """Messages → text: the chat template when the tokenizer has one, else an HH-style
    transcript (a single user message is sent as it is, like the service does)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
    if generation_prompt and len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = "".join(
        f"\n\n{'Human' if m['role'] in ('user', 'system') else 'Assistant'}: {m['content']}"
        for m in messages
    )
    return turns + ("\n\nAssistant:" if generation_prompt else "")


def encode_prompt(tokenizer, messages: Messages, max_tokens: int) -> list[int]:
    """Token ids of a rendered prompt, keeping its last ``max_tokens`` tokens."""
    text = render_chat(tokenizer, messages, generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return ids[-max_tokens:]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → ``(input_ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (what ``generate`` uses, so the training forward
    passes see the same positions as sampling did)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_widths(query_mask: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """For rows of a left-padded batch: the first query column any row uses and the number of
    response columns any row uses (at least 1), i.e. the slices ``[:, left:]`` and
    ``[:, :width]`` that drop only columns that are padding in every row."""
    used = query_mask.bool().any(0).nonzero()
    left = int(used[0]) if len(used) else query_mask.shape[1]
    width = max(1, int(mask.long().sum(-1).max())) if mask.numel() else 1
    return left, width


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise PPOError("the policy has no EOS token (neither its generation config nor tokenizer)")
    return ids


def same_vocabulary(a, b) -> bool:
    """True when every token of tokenizer ``a`` has the same id in tokenizer ``b`` (``b`` may
    have extra tokens, e.g. an added pad token), so a model of ``b`` can read ``a``'s ids."""
    va, vb = a.get_vocab(), b.get_vocab()
    return all(vb.get(token) == i for token, i in va.items())


# -------------------------------------------------------------------------------------- models


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: every ``nn.Dropout`` gets p = 0 and every float attribute whose
    name contains ``dropout`` (e.g. Llama's ``attention_dropout``, applied functionally) is set
    to 0, on the modules and on the config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)


class ValueModel(torch.nn.Module):
    """A transformer backbone and a one-output head applied at every position: ``V(s_t)``."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return self.head(out.last_hidden_state).squeeze(-1).float()


def build_value_model(
    source: Path, *, fresh_head: bool, seed: int, offset: float = 0.0
) -> ValueModel:
    """The value model from ``source`` (a reward model directory or the policy) loaded as a
    one-output sequence classifier; with ``fresh_head`` the head is re-initialised (std
    1/√(d+1), seeded). ``offset`` is added to the head's bias (a head without one gets one):
    a reward model's normalisation, so that the value model starts on the scale of the
    normalised scores it is to predict."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from trainer.models import init_score_head, score_head

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised: score.weight" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if fresh_head:
        init_score_head(model, seed=seed)
    head = score_head(model)
    if offset:
        with torch.no_grad():
            if head.bias is None:
                weight = head.weight
                head = torch.nn.Linear(head.in_features, 1, dtype=weight.dtype)
                head.weight.copy_(weight)
                head.bias.zero_()
            head.bias.add_(offset)
    backbone = getattr(model, model.base_model_prefix)
    return ValueModel(backbone, head)


def _load_reward(path: str, device) -> tuple[Scorer, Any]:
    """The frozen reward model and its tokenizer (for the vocabulary check)."""
    from transformers import AutoTokenizer

    from trainer.reward import load_reward_model

    scorer = load_reward_model(path, device=device)
    tokenizer = getattr(scorer, "tokenizer", None) or AutoTokenizer.from_pretrained(path)
    return scorer, tokenizer


# --------------------------------------------------------------------------------- the trainer


def _comparison(prefix: str, policy: Sequence[float], reference: Sequence[float]) -> dict:
    """Mean reward of each side, the gain and the policy's win rate (ties count half), paired
    by prompt; NaN for no prompts."""
    n = len(policy)
    if n == 0:
        nan = math.nan
        return {
            f"{prefix}{k}": nan
            for k in ("policy_reward", "reference_reward", "reward_gain", "win_rate")
        }
    wins = sum(
        1.0 if p > q else 0.5 if p == q else 0.0 for p, q in zip(policy, reference, strict=True)
    )
    return {
        f"{prefix}policy_reward": sum(policy) / n,
        f"{prefix}reference_reward": sum(reference) / n,
        f"{prefix}reward_gain": (sum(policy) - sum(reference)) / n,
        f"{prefix}win_rate": wins / n,
    }


def _step_seed(seed: int, *parts: int) -> int:
    key = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


@dataclasses.dataclass
class Rollout:
    """Everything stages 2–5 produce for one batch of prompts (tensors on the device)."""

    prompts: list[Prompt]
    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor
    texts: list[str]
    scores: torch.Tensor
    raw_scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class PPOTrainer:
    """A PPO run: models, optimiser, the numbered stages and the run directory."""

    def __init__(
        self,
        config: PPOConfig,
        *,
        reward: Scorer | None = None,
        reward_tokenizer=None,
        prompts: Sequence[Prompt] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trainer.models import resolve_model

        self.config = config
        c = config
        if c.steps < 0 or c.batch_size < 1 or c.mini_batches < 1 or c.ppo_epochs < 1:
            raise PPOError("steps ≥ 0, batch_size ≥ 1, mini_batches ≥ 1, ppo_epochs ≥ 1")
        if c.mini_batches > c.batch_size:
            raise PPOError("mini_batches cannot exceed batch_size")
        if c.value_warmup_steps < 0:
            raise PPOError("value_warmup_steps must be ≥ 0")
        if c.value_init not in ("auto", "reward", "policy"):
            raise PPOError("value_init must be auto, reward or policy")
        if not 0 < c.top_p <= 1:
            raise PPOError("top_p must be in (0, 1]")
        if c.temperature <= 0:
            raise PPOError("temperature must be positive (PPO samples from the policy)")
        if not c.out:
            raise PPOError("an output directory is required")
        if reward is None and not c.reward:
            raise PPOError("a reward model directory is required (--reward)")
        self.out = Path(c.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(cpu=c.cpu or not torch.cuda.is_available())
        self.device = self.accelerator.device
        torch.manual_seed(c.seed)

        # Prompts (stage 1's pool) and the held-out split.
        all_prompts = (
            list(prompts) if prompts is not None else load_prompts(c.prompts, token=c.token)
        )
        self.train_prompts, self.held_out = split_prompts(
            all_prompts, fraction=c.eval_fraction, seed=c.split_seed
        )
        if not self.train_prompts:
            raise PPOError("no training prompts left after the held-out split")
        self.eval_prompts = (self.held_out or self.train_prompts)[: c.eval_samples]

        # Policy and reference.
        self.policy_path = resolve_model(c.policy)
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        self.tokenizer.padding_side = "left"
        policy = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=torch.float32)
        self.eos_ids = eos_token_ids(policy, self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.eos_ids[0]
        )
        disable_dropout(policy)
        if c.lora:
            from peft import get_peft_model

            policy = get_peft_model(policy, self._lora_config("CAUSAL_LM"))
            self.ref = None
        else:
            self.ref = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=torch.float32)
            disable_dropout(self.ref)
            self.ref.requires_grad_(False)
            self.ref.eval().to(self.device)

        # Reward model and value model.
        if reward is None:
            reward, reward_tokenizer = _load_reward(c.reward, self.device)
        self.reward = reward
        self.reward_tokenizer = reward_tokenizer
        reads_policy_tokens = reward_tokenizer is not None and same_vocabulary(
            self.tokenizer, reward_tokenizer
        )
        from_reward = c.value_init == "reward" or (
            c.value_init == "auto" and reads_policy_tokens and bool(c.reward)
        )
        if from_reward and not (reads_policy_tokens and c.reward):
            raise PPOError(
                "value_init='reward' needs a reward model whose tokenizer has the policy's "
                "vocabulary (per-token values are read on the policy's tokens)"
            )
        self.value_source = "reward" if from_reward else "policy"
        from trainer.reward import normalisation_bias, read_meta

        value = build_value_model(
            Path(c.reward) if from_reward else self.policy_path,
            fresh_head=not from_reward,
            seed=c.seed,
            offset=normalisation_bias(read_meta(c.reward)) if from_reward else 0.0,
        )
        disable_dropout(value)
        if c.lora:
            from peft import get_peft_model

            value.backbone = get_peft_model(value.backbone, self._lora_config(None))
            value.head.requires_grad_(True)

        params = [p for p in policy.parameters() if p.requires_grad]
        params += [p for p in value.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=c.lr, eps=1e-5)
        self.policy, self.value, self.optimizer = self.accelerator.prepare(policy, value, optimizer)
        self.kl_ctl = ops.kl_controller(c.kl_coef, c.target_kl, c.kl_horizon)
        self.ptx_texts = load_ptx_texts(c.ptx_data, self.tokenizer) if c.ptx_data else []
        if c.ptx_coef > 0 and not self.ptx_texts:
            raise PPOError("--ptx-coef needs --ptx-data")
        self.step = 0
        self.history: list[dict] = []
        self._perms: dict[int, list[int]] = {}

    def _lora_config(self, task_type: str | None):
        from peft import LoraConfig

        return LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=task_type,
        )

    # ----------------------------------------------------------------------------- helpers

    @property
    def unwrapped_policy(self):
        return self.accelerator.unwrap_model(self.policy)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference model: a copy, or the policy with its adapter off."""
        if self.ref is not None:
            yield self.ref
            return
        model = self.unwrapped_policy
        with model.disable_adapter():
            yield model

    def _generation_config(self, *, greedy: bool = False):
        from transformers import GenerationConfig

        c = self.config
        kwargs: dict[str, Any] = dict(
            max_new_tokens=c.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
        )
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=0)
        return GenerationConfig(**kwargs)

    def encode(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            encode_prompt(self.tokenizer, p.messages, self.config.max_prompt_tokens)
            for p in prompts
        ]
        ids, mask = left_pad(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def sample(self, model, queries, query_mask, *, greedy: bool = False):
        """Stage 2 for one batch: generated responses (B, T) with padding after the first EOS,
        the response mask and whether each response ended with EOS."""
        was_training = model.training
        model.eval()
        out = model.generate(
            input_ids=queries,
            attention_mask=query_mask,
            generation_config=self._generation_config(greedy=greedy),
        )
        model.train(was_training)
        responses = out[:, queries.shape[1] :]
        mask, has_eos = ops.response_mask(responses, self.eos_ids)
        responses = torch.where(mask, responses, torch.full_like(responses, self.pad_id))
        return responses, mask, has_eos

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        texts = []
        for row, m in zip(responses.tolist(), mask.sum(-1).tolist(), strict=True):
            texts.append(self.tokenizer.decode(row[:m], skip_special_tokens=True).strip())
        return texts

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str], has_eos: torch.Tensor):
        """Stage 3: ``(scores, raw_scores)`` — raw_scores straight from the reward model, scores
        with the no-EOS penalty applied."""
        raw = self.reward.score([p.messages for p in prompts], list(texts))
        raw = torch.as_tensor(raw, dtype=torch.float32).reshape(-1).to(self.device)
        scores = raw.clone()
        if self.config.no_eos_penalty is not None:
            penalty = torch.full_like(scores, float(self.config.no_eos_penalty))
            scores = torch.where(has_eos.to(self.device), scores, penalty)
        return scores, raw

    def forward_logprobs(self, model, queries, query_mask, responses, mask, *, entropy=False):
        """Log-probabilities of ``responses`` (and optionally per-token entropies) under
        ``model``, with the logits divided by the sampling temperature."""
        ids = torch.cat([queries, responses], dim=1)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        length = responses.shape[1]
        logits = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions(attention),
            logits_to_keep=length + 1,
            use_cache=False,
        ).logits[:, :-1]
        logits = logits.float() / self.config.temperature
        logprobs = ops.logprobs_from_logits(logits, responses)
        logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, ops.INVALID_LOGPROB))
        ent = ops.entropy_from_logits(logits.detach()) if entropy else None
        return logprobs, ent

    def forward_values(self, queries, query_mask, responses, mask):
        """Per-token values ``V(s_t)`` of the state before each response token."""
        ids = torch.cat([queries, responses], dim=1)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        values = self.value(ids, attention, positions(attention))
        values = values[:, queries.shape[1] - 1 : -1]
        return values * mask

    # ------------------------------------------------------------------------- the stages

    def batch_prompts(self, step: int) -> list[Prompt]:
        """Stage 1: this step's prompts — consecutive slices of seeded permutations of the
        training prompts (a new permutation per epoch), a function of the step only."""
        n = len(self.train_prompts)
        b = self.config.batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = (step * world + rank) * b
        chosen = []
        for position in range(start, start + b):
            epoch, index = divmod(position, n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(_step_seed(self.config.seed, 0, epoch))
                self._perms = {epoch: torch.randperm(n, generator=g).tolist()}
            chosen.append(self.train_prompts[self._perms[epoch][index]])
        return chosen

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt]) -> tuple[Rollout, dict[str, float]]:
        """Stages 2–4: sample, score, forward passes. Returns the rollout and its timings."""
        timings = {}
        queries, query_mask = self.encode(prompts)
        t0 = time.perf_counter()
        responses, mask, has_eos = self.sample(self.unwrapped_policy, queries, query_mask)
        timings["generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = self.decode(responses, mask)
        scores, raw = self.score(prompts, texts, has_eos)
        timings["scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.policy.eval()
        logprobs, entropy = self.forward_logprobs(
            self.policy, queries, query_mask, responses, mask, entropy=True
        )
        with self.reference() as ref:
            ref_logprobs, _ = self.forward_logprobs(ref, queries, query_mask, responses, mask)
        values = self.forward_values(queries, query_mask, responses, mask)
        timings["forward"] = time.perf_counter() - t0
        rollout = Rollout(
            prompts=list(prompts),
            queries=queries,
            query_mask=query_mask,
            responses=responses,
            mask=mask,
            has_eos=has_eos,
            texts=texts,
            scores=scores,
            raw_scores=raw,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            values=values,
        )
        return rollout, timings

    def compute_advantages(self, r: Rollout, *, lam: float | None = None) -> None:
        """Stage 5: KL-penalised per-token rewards, the score on the last real token, GAE and
        whitened advantages (in place on the rollout). ``lam`` overrides the config's λ (1:
        the returns are Monte-Carlo, sums of the rewards to the end, with no bootstrap from
        the values)."""
        c = self.config
        maskf = r.mask.float()
        kl = ops.kl_k1(r.logprobs, r.ref_logprobs) * maskf
        rewards = -self.kl_ctl.value * kl
        last = r.mask.long().sum(-1) - 1  # the EOS token (or the last token when cut off)
        rewards[torch.arange(len(last), device=rewards.device), last] += r.scores
        if c.whiten_rewards:
            rewards = ops.masked_whiten(rewards, r.mask, shift_mean=False)
        lam = c.lam if lam is None else lam
        advantages, returns = ops.gae(rewards, r.values, r.mask, gamma=c.gamma, lam=lam)
        r.rewards = rewards
        r.returns = returns
        r.advantages = ops.masked_whiten(advantages, r.mask)

    def _ptx_loss(self, step: int, epoch: int, index: int, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_step_seed(self.config.seed, 2, step, epoch, index))
        picks = torch.randint(len(self.ptx_texts), (size,), generator=g).tolist()
        limit = self.config.max_prompt_tokens + self.config.max_new_tokens
        rows = [
            self.tokenizer(
                self.ptx_texts[i], add_special_tokens=not has_chat_template(self.tokenizer)
            )["input_ids"][:limit]
            for i in picks
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        labels = torch.where(attention.bool(), ids, torch.full_like(ids, -100))
        return self.policy(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions(attention),
            labels=labels,
        ).loss

    def update(self, r: Rollout, step: int) -> dict[str, float]:
        """Stage 6: PPO epochs over shuffled mini-batches; returns the update's statistics."""
        c = self.config
        self.policy.train()
        self.value.train()
        n = r.responses.shape[0]
        stats: dict[str, list[float]] = {}
        skipped = 0
        ratio_first = math.nan

        def add(name: str, value: torch.Tensor | float) -> None:
            stats.setdefault(name, []).append(float(value))

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        frozen = step < c.value_warmup_steps  # value warm-up: the policy is not trained
        for epoch in range(c.ppo_epochs):
            g = torch.Generator().manual_seed(_step_seed(c.seed, 1, step, epoch))
            order = torch.randperm(n, generator=g)
            for index, mb in enumerate(torch.tensor_split(order, c.mini_batches)):
                mb = mb.to(self.device)
                # Only the columns this mini-batch uses: the batch's left padding beyond its own
                # longest prompt, and response positions after its longest response, are
                # padding in every row (masked out of every loss; same numbers, less work).
                left, width = trim_widths(r.query_mask[mb], r.mask[mb])
                queries, query_mask = r.queries[mb, left:], r.query_mask[mb, left:]
                responses, mask = r.responses[mb, :width], r.mask[mb, :width]
                with torch.set_grad_enabled(not frozen):
                    logprobs, entropy = self.forward_logprobs(
                        self.policy, queries, query_mask, responses, mask, entropy=True
                    )
                vpred = self.forward_values(queries, query_mask, responses, mask)
                old_values = r.values[mb, :width]
                returns, adv = r.returns[mb, :width], r.advantages[mb, :width]
                old_logprobs = r.logprobs[mb, :width]

                vclipped = old_values + (vpred - old_values).clamp(
                    -c.cliprange_value, c.cliprange_value
                )
                if frozen:  # warm-up: the values may move as far as the returns are
                    vf_losses = (vpred - returns) ** 2
                else:
                    vf_losses = torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2)
                vf_loss = 0.5 * ops.masked_mean(vf_losses, mask)
                vf_clipfrac = ops.masked_mean(
                    ((vclipped - returns) ** 2 > (vpred - returns) ** 2).float(), mask
                )

                logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
                ratio = torch.exp(logratio)
                pg_losses = -adv * ratio
                pg_losses2 = -adv * ratio.clamp(1.0 - c.cliprange, 1.0 + c.cliprange)
                pg_loss = ops.masked_mean(torch.max(pg_losses, pg_losses2), mask)
                loss = c.vf_coef * vf_loss if frozen else pg_loss + c.vf_coef * vf_loss
                if c.ptx_coef > 0 and not frozen:
                    ptx = self._ptx_loss(step, epoch, index, len(mb))
                    loss = loss + c.ptx_coef * ptx
                    add("loss/ptx", ptx.detach())

                if not torch.isfinite(loss):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.accelerator.backward(loss)
                grad_norm = self.accelerator.clip_grad_norm_(params, c.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

                with torch.no_grad():
                    mean_ratio = ops.masked_mean(ratio, mask)
                    if epoch == 0 and index == 0:
                        ratio_first = float(mean_ratio)
                    add("policy/approx_kl", 0.5 * ops.masked_mean(logratio**2, mask))
                    add("policy/clipfrac", ops.masked_mean((pg_losses2 > pg_losses).float(), mask))
                    add("policy/entropy", ops.masked_mean(entropy, mask))
                    add("loss/policy", pg_loss)
                    add("loss/value", vf_loss)
                    add("val/clipfrac", vf_clipfrac)
                    add("val/ratio", mean_ratio)
                    add("val/ratio_var", ops.masked_var(ratio, mask, unbiased=False))
                    add("optim/grad_norm", grad_norm)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/ratio_first"] = ratio_first
        out["guard/skipped_minibatches"] = float(skipped)
        out["policy/frozen"] = float(frozen)
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        """One PPO step (stages 1–6) → its metrics row (``guard/skipped_rollout`` = 1 when the
        batch was dropped by the NaN/inf guard)."""
        c = self.config
        seed_all(_step_seed(c.seed, 3, step, self.accelerator.process_index))
        t_start = time.perf_counter()
        prompts = self.batch_prompts(step)
        r, timings = self.rollout(prompts)
        world = self.accelerator.num_processes
        row: dict[str, Any] = {"step": step + 1, "episodes": (step + 1) * c.batch_size * world}
        finite = bool(
            torch.isfinite(r.scores).all()
            and torch.isfinite(r.raw_scores).all()
            and torch.isfinite(torch.where(r.mask, r.logprobs, 0.0)).all()
            and torch.isfinite(torch.where(r.mask, r.ref_logprobs, 0.0)).all()
            and torch.isfinite(r.values).all()
        )
        maskf = r.mask.float()
        n_tokens = float(maskf.sum())
        if not finite:
            row["guard/skipped_rollout"] = 1.0
            row["kl_coef"] = self.kl_ctl.value
            update = {}
        else:
            # Value warm-up: the value model fits Monte-Carlo returns (λ = 1), not returns
            # bootstrapped from its own values, which may start far off (a reward model's
            # scores of unfinished prefixes).
            self.compute_advantages(r, lam=1.0 if step < c.value_warmup_steps else None)
            t0 = time.perf_counter()
            update = self.update(r, step)
            timings["update"] = time.perf_counter() - t0
            kl_seq = (ops.kl_k1(r.logprobs, r.ref_logprobs) * maskf).sum(-1)
            row.update(
                self._reduce(
                    {
                        "objective/scores": r.scores.mean(),
                        "objective/scores_std": r.scores.std(unbiased=False),
                        "objective/raw_scores": r.raw_scores.mean(),
                        "objective/kl": kl_seq.mean(),
                        "objective/non_score_reward": (-self.kl_ctl.value * kl_seq).mean(),
                        "objective/rlhf_reward": (r.scores - self.kl_ctl.value * kl_seq).mean(),
                        "objective/entropy": ops.masked_mean(r.entropy, r.mask),
                        "val/eos_fraction": r.has_eos.float().mean(),
                        "val/mean_length": maskf.sum(-1).mean(),
                        "val/mean_value": ops.masked_mean(r.values, r.mask),
                        "val/mean_return": ops.masked_mean(r.returns, r.mask),
                    }
                )
            )
            row["val/explained_variance"] = ops.explained_variance(r.values, r.returns, r.mask)
            row["kl_coef"] = self.kl_ctl.value
            self.kl_ctl.update(row["objective/kl"], c.batch_size * self.accelerator.num_processes)
            row["guard/skipped_rollout"] = 0.0
        row.update(update)
        total = time.perf_counter() - t_start
        row["time/step"] = total
        for name, seconds in timings.items():
            row[f"time/{name}"] = seconds
        row["time/generation_share"] = timings["generation"] / total if total > 0 else math.nan
        # Throughput of all processes (they run in lockstep: gradients are synchronised).
        row["tokens_per_s"] = n_tokens * world / total if total > 0 else math.nan
        row["episodes_per_s"] = c.batch_size * world / total if total > 0 else math.nan
        row["lr"] = c.lr
        return row

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = list(values)
        stacked = torch.stack(
            [torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in names]
        )
        stacked = self.accelerator.reduce(stacked, reduction="mean")
        return {k: float(v) for k, v in zip(names, stacked.tolist(), strict=True)}

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def eval_samples(self, step: int) -> list[dict]:
        """Greedy responses of the policy to the fixed evaluation prompts, with their scores."""
        prompts = self.eval_prompts
        queries, query_mask = self.encode(prompts)
        responses, mask, has_eos = self.sample(
            self.unwrapped_policy, queries, query_mask, greedy=True
        )
        texts = self.decode(responses, mask)
        scores, _ = self.score(prompts, texts, has_eos)
        return [
            {
                "step": step,
                "prompt": p.messages,
                "response": t,
                "score": float(s),
                "eos": bool(e),
            }
            for p, t, s, e in zip(prompts, texts, scores.tolist(), has_eos.tolist(), strict=True)
        ]

    @torch.no_grad()
    def final_evaluation(self) -> dict[str, Any]:
        """On the held-out prompts: the tuned policy's and the reference's mean reward (one
        sampled response each, same settings and seed), the policy's win rate against the
        reference under the reward model (ties count half) and KL(π ‖ π_ref) (mean sequence
        k1 on the policy's samples).

        The reward is the training score (a response cut off before EOS gets the no-EOS
        penalty), so a policy can gain by finishing more often. To tell that apart from better
        answers, the same comparison is also given on the reward model's own score of the
        text (``raw_*``: the penalty not applied) and on the prompts where both responses
        ended with EOS (``finished_*``)."""
        c = self.config
        prompts = self.held_out[: c.eval_max]
        if not prompts:
            return {"prompts": 0}
        pol_scores, ref_scores, kls, pol_eos, ref_eos = [], [], [], [], []
        pol_raw, ref_raw = [], []
        for start in range(0, len(prompts), c.batch_size):
            batch = prompts[start : start + c.batch_size]
            queries, query_mask = self.encode(batch)
            seed_all(_step_seed(c.seed, 4, start))
            responses, mask, has_eos = self.sample(self.unwrapped_policy, queries, query_mask)
            scores, raw = self.score(batch, self.decode(responses, mask), has_eos)
            logprobs, _ = self.forward_logprobs(self.policy, queries, query_mask, responses, mask)
            with self.reference() as ref:
                ref_lp, _ = self.forward_logprobs(ref, queries, query_mask, responses, mask)
                seed_all(_step_seed(c.seed, 4, start))
                ref_responses, ref_mask, ref_has_eos = self.sample(ref, queries, query_mask)
            rscores, rraw = self.score(batch, self.decode(ref_responses, ref_mask), ref_has_eos)
            kls += (ops.kl_k1(logprobs, ref_lp) * mask).sum(-1).tolist()
            pol_scores += scores.tolist()
            ref_scores += rscores.tolist()
            pol_raw += raw.tolist()
            ref_raw += rraw.tolist()
            pol_eos += has_eos.float().tolist()
            ref_eos += ref_has_eos.float().tolist()
        n = len(prompts)
        both = [i for i in range(n) if pol_eos[i] and ref_eos[i]]
        return {
            "prompts": n,
            **_comparison("", pol_scores, ref_scores),
            "kl": sum(kls) / n,
            "policy_eos_fraction": sum(pol_eos) / n,
            "reference_eos_fraction": sum(ref_eos) / n,
            **_comparison("raw_", pol_raw, ref_raw),
            "finished_prompts": len(both),
            **_comparison("finished_", [pol_raw[i] for i in both], [ref_raw[i] for i in both]),
        }

    # ----------------------------------------------------------------------- checkpoints

    def _trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().clone() for k, v in module.named_parameters() if v.requires_grad
        }

    def save_checkpoint(self) -> Path:
        """Write ``out/checkpoint/state.pt`` atomically: trainable weights of the policy and the
        value model, the optimiser, the KL controller and the step."""
        target = self.out / CHECKPOINT_DIR
        tmp = self.out / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "step": self.step,
                "policy": self._trainable_state(self.unwrapped_policy),
                "value": self._trainable_state(self.accelerator.unwrap_model(self.value)),
                "optimizer": self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(),
                "config": dataclasses.asdict(self.config),
            },
            tmp / "state.pt",
        )
        old = self.out / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self) -> bool:
        """Restore from ``out/checkpoint``; False when there is none."""
        path = self.out / CHECKPOINT_DIR / "state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        for module, key in (
            (self.unwrapped_policy, "policy"),
            (self.accelerator.unwrap_model(self.value), "value"),
        ):
            missing = set(state[key]) - {k for k, _ in module.named_parameters()}
            if missing:
                raise PPOError(f"the checkpoint does not match this run's {key} model")
            with torch.no_grad():
                named = dict(module.named_parameters())
                for k, v in state[key].items():
                    named[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.step = int(state["step"])
        return True

    # ----------------------------------------------------------------------------- output

    def save_policy(self) -> None:
        """The tuned policy in Hugging Face format in ``out/`` (LoRA merged), with the
        tokenizer (chat template) and generation config, ready for ``prefero generate``."""
        model = self.unwrapped_policy
        if self.config.lora:
            model = copy.deepcopy(model).merge_and_unload()
        if self.accelerator.is_main_process:
            model.save_pretrained(self.out)
            tokenizer = copy.deepcopy(self.tokenizer)
            tokenizer.padding_side = "right"
            tokenizer.save_pretrained(self.out)


def seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def _clean(row: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def _append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(_clean(row), ensure_ascii=False, default=_json_default) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the rows of ``path`` with step ≤ ``last_step`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    kept = [r for r in rows if int(r.get("step", 0)) <= last_step]
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8"
    )
    return kept


PLOT_PANELS = (
    ("reward", ("objective/scores", "objective/rlhf_reward")),
    ("KL (nats per response)", ("objective/kl",)),
    ("policy", ("policy/approx_kl", "policy/clipfrac", "objective/entropy", "val/eos_fraction")),
    ("value model", ("val/explained_variance",)),
)


def plot_training(rows: Sequence[dict], path: Path) -> None:
    """``training.png``: reward and KL curves, plus the policy and value diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, names) in zip(axes.flat, PLOT_PANELS, strict=True):
        for name in names:
            points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PROGRESS_KEYS = (
    ("objective/scores", "score"),
    ("objective/kl", "kl"),
    ("val/eos_fraction", "eos"),
    ("time/generation_share", "gen"),
    ("tokens_per_s", "tok/s"),
)


def train_ppo(
    config: PPOConfig,
    *,
    reward: Scorer | None = None,
    reward_tokenizer=None,
    prompts: Sequence[Prompt] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run PPO as configured; write the run directory; return ``prefero_ppo.json``'s content.

    ``reward``/``reward_tokenizer``/``prompts`` replace the ones named by the config (tests
    use a rule-based scorer)."""
    from tqdm import tqdm

    trainer = PPOTrainer(config, reward=reward, reward_tokenizer=reward_tokenizer, prompts=prompts)
    c = config
    out = trainer.out
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
    resumed = c.resume and trainer.load_checkpoint()
    main = trainer.accelerator.is_main_process
    if main:
        (out / "ppo_config.json").write_text(
            json.dumps(dataclasses.asdict(c), indent=2, default=_json_default) + "\n",
            encoding="utf-8",
        )
        if resumed:
            trainer.history = _truncate_jsonl(metrics_path, trainer.step)
            _truncate_jsonl(samples_path, trainer.step)
        else:
            for path in (metrics_path, samples_path):
                path.unlink(missing_ok=True)
    if log and main and resumed:
        log(f"resumed from {out / CHECKPOINT_DIR} at step {trainer.step}")
    if not resumed and c.eval_every > 0 and main:
        _append_jsonl(samples_path, trainer.eval_samples(0))
    bar = tqdm(
        total=c.steps,
        initial=trainer.step,
        desc="ppo",
        disable=not (c.progress and main),
        dynamic_ncols=True,
    )
    while trainer.step < c.steps:
        row = trainer.train_step(trainer.step)
        trainer.step += 1
        trainer.history.append(row)
        if main:
            _append_jsonl(metrics_path, [row])
            if row.get("guard/skipped_rollout") or row.get("guard/skipped_minibatches"):
                bar.write(
                    f"step {trainer.step}: non-finite values — skipped "
                    f"{'the rollout' if row.get('guard/skipped_rollout') else ''}"
                    f"{int(row.get('guard/skipped_minibatches', 0))} mini-batch(es)"
                )
            bar.set_postfix(
                {
                    short: f"{row[k]:.3g}"
                    for k, short in PROGRESS_KEYS
                    if isinstance(row.get(k), float)
                },
                refresh=False,
            )
            bar.update(1)
            if c.eval_every > 0 and (trainer.step % c.eval_every == 0 or trainer.step == c.steps):
                _append_jsonl(samples_path, trainer.eval_samples(trainer.step))
            if c.plot_every > 0 and trainer.step % c.plot_every == 0:
                plot_training(trainer.history, out / "training.png")
        if c.save_every > 0 and trainer.step % c.save_every == 0:
            trainer.accelerator.wait_for_everyone()
            if main:
                trainer.save_checkpoint()
    bar.close()
    evaluation = trainer.final_evaluation()
    result = {
        "format": FORMAT,
        "policy": str(trainer.policy_path),
        "reward": c.reward,
        "value_init": trainer.value_source,
        "steps": trainer.step,
        "train_prompts": len(trainer.train_prompts),
        "held_out_prompts": len(trainer.held_out),
        "final_kl_coef": trainer.kl_ctl.value,
        "eval": evaluation,
        "config": dataclasses.asdict(c),
    }
    if main:
        plot_training(trainer.history, out / "training.png")
        trainer.save_policy()
        (out / "eval.json").write_text(
            json.dumps(_clean(evaluation), indent=2) + "\n", encoding="utf-8"
        )
        (out / "prefero_ppo.json").write_text(
            json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8"
        )
    if log and main and evaluation.get("prompts"):
        log(
            "held-out evaluation ({prompts} prompts): reward {policy_reward:.3f} vs reference "
            "{reference_reward:.3f}, win rate {win_rate:.2f}, KL {kl:.2f} nats; ended with EOS "
            "{policy_eos_fraction:.0%} vs {reference_eos_fraction:.0%}; both ended on "
            "{finished_prompts} prompts: reward model score {finished_policy_reward:.3f} vs "
            "{finished_reference_reward:.3f}, win rate {finished_win_rate:.2f}".format(**evaluation)
        )
    if log and main:
        log(f"policy written to {out}")
    return result
