"""Local generation with Hugging Face transformers (the ``transformers`` backend).

Imported only by :func:`app.generation.load_backend`, i.e. in the worker, never in the web app.

Requests are grouped by ``max_new_tokens``, sorted by prompt length within a group so that
little padding is needed, and generated in batches with left padding, an attention mask and the
KV cache. Rows of one batch may have different temperatures and top-p values (the K slots of a
prompt usually do): :class:`RowSampling` applies each row's own settings, so the K completions
of a prompt are generated together instead of in K passes. Each batch is seeded with the seed of
its first request, which is the seed recorded for every completion of that batch.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch  # noqa: TID251 - worker only, loaded through load_backend
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from app.generation.base import (
    BUILTIN_MODEL,
    BackendError,
    GenerationRequest,
    GenerationResult,
    Sampling,
)


def machine_threads() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class RowSampling(LogitsProcessor):
    """Per-row temperature and nucleus (top-p) filtering, as transformers' temperature and
    top-p warpers do for a whole batch; a temperature of 0 makes that row greedy."""

    def __init__(self, temperatures: list[float], top_ps: list[float]) -> None:
        t = torch.tensor(temperatures, dtype=torch.float32)
        self.greedy = t <= 0
        self.temperatures = torch.where(self.greedy, torch.ones_like(t), t)[:, None]
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        scores = scores / self.temperatures.to(device)
        # Nucleus: drop the lowest-probability tokens whose mass is at most 1 - top_p.
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - self.top_ps.to(device))
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
        greedy = self.greedy.to(device)
        if bool(greedy.any()):
            best = torch.full_like(scores, float("-inf"))
            best.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
            scores = torch.where(greedy[:, None], best, scores)
        return scores


class _StopWhenSet(StoppingCriteria):
    """Ends every row of the batch at the next step once ``event`` is set (worker shutdown)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class TransformersBackend:
    """A causal LM loaded once, generating batched completions for chat conversations."""

    backend = "transformers"
    stop_event: threading.Event | None = None
    """When set during ``generate``, the batch ends at the next token: the worker is shutting
    down and will not save the (truncated) results."""

    def __init__(
        self,
        model: str,
        *,
        cache_dir: str | Path,
        threads: int = 0,
        batch_size: int = 32,
        device: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.threads = threads or machine_threads()
        torch.set_num_threads(self.threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        if model == BUILTIN_MODEL:
            from app.generation.builtin import builtin_model_dir

            self.model_name = BUILTIN_MODEL
            source = str(builtin_model_dir(cache_dir))
        else:
            self.model_name = model
            source = model
            path = Path(model).expanduser()
            if path.exists():
                source = str(path)
            elif _looks_like_path(model):
                raise BackendError(
                    f"cannot load model {model!r}: no such directory (give a local model "
                    f"directory, a Hugging Face hub name, or {BUILTIN_MODEL!r})"
                )

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendError(
                    f"out of memory while loading model {model!r} on {self.device}"
                ) from exc
            raise BackendError(
                f"cannot load model {model!r}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        try:
            self.model.to(self.device)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BackendError(
                    f"out of memory while moving model {model!r} to {self.device}"
                ) from exc
            raise
        self.model.eval()

        tok = self.tokenizer
        tok.padding_side = "left"
        eos_ids = self.model.generation_config.eos_token_id
        if eos_ids is None:
            eos_ids = tok.eos_token_id
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise BackendError(
                    f"model {model!r} has neither a padding nor an end-of-sequence token"
                )
            tok.pad_token = tok.eos_token
        self.pad_token_id: int = tok.pad_token_id
        self.eos_token_ids: set[int] = (
            set()
            if eos_ids is None
            else {int(i) for i in (eos_ids if isinstance(eos_ids, list | tuple) else [eos_ids])}
        )
        # Only what the request asks for: drop the model's own sampling defaults (top_k,
        # repetition_penalty…) so the recorded parameters are the exact ones used.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id,
        )
        self.has_chat_template = bool(getattr(tok, "chat_template", None))

    # ------------------------------------------------------------------------------ rendering

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The exact text sent to the model and its token ids."""
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            # The template writes the special tokens (BOS…) itself.
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text, ids
        if len(messages) == 1 and messages[0].get("role") == "user":
            text = messages[0]["content"]
            return text, self.tokenizer(text)["input_ids"]
        raise BackendError(
            f"model {self.model_name!r} has no chat template; it cannot take multi-turn/system "
            "messages (give it a single user message, or use a chat model)"
        )

    # ----------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        rendered: dict[int, tuple[str, list[int]]] = {}
        for i, req in enumerate(requests):
            try:
                rendered[i] = self.render(req.messages)
            except BackendError:
                raise
            except Exception as exc:  # the chat template rejected this conversation
                results[i] = GenerationResult(
                    key=req.key,
                    text=None,
                    input_text="",
                    params=self._params(req.sampling, req.sampling.seed),
                    error=f"cannot apply the chat template: {type(exc).__name__}: {exc}",
                )
                continue
            if not rendered[i][1]:
                results[i] = GenerationResult(
                    key=req.key,
                    text=None,
                    input_text=rendered[i][0],
                    params=self._params(req.sampling, req.sampling.seed),
                    error="empty prompt",
                )
                del rendered[i]

        groups: dict[int, list[int]] = {}
        for i in rendered:
            groups.setdefault(requests[i].sampling.max_new_tokens, []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: (len(rendered[i][1]), i))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                for i, result in zip(
                    batch, self._generate_batch(requests, rendered, batch), strict=True
                ):
                    results[i] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        rendered: dict[int, tuple[str, list[int]]],
        batch: list[int],
    ) -> list[GenerationResult]:
        sampling = requests[batch[0]].sampling
        seed = sampling.seed
        width = max(len(rendered[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = rendered[i][1]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "num_beams": 1}
        if self.stop_event is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(self.stop_event)])
        settings = {(requests[i].sampling.temperature, requests[i].sampling.top_p) for i in batch}
        if len(settings) > 1:  # rows sample differently: one processor applies each row's own
            rows = [requests[i].sampling for i in batch]
            kwargs.update(
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList(
                    [RowSampling([r.temperature for r in rows], [r.top_p for r in rows])]
                ),
            )
        elif sampling.temperature > 0:
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0
            )
        else:
            kwargs.update(do_sample=False)
        torch.manual_seed(seed)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    **kwargs,
                )
        except Exception as exc:
            if is_out_of_memory(exc):
                self._free_cache()
                raise BackendError(
                    f"out of memory generating a batch of {len(batch)} completions of up to "
                    f"{sampling.max_new_tokens} new tokens with model {self.model_name!r} on "
                    f"{self.device}; lower the batch size or max_new_tokens"
                ) from exc
            raise
        new = output[:, width:].tolist()
        results = []
        for row, i in enumerate(batch):
            tokens = new[row]
            stop = next((n for n, t in enumerate(tokens) if t in self.eos_token_ids), None)
            if stop is None:
                finish, count = "length", len(tokens)
            else:
                finish, count = "stop", stop + 1  # the stop token was generated too
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True).strip()
            params = self._params(requests[i].sampling, seed)
            params.update(finish_reason=finish, new_tokens=count)
            results.append(
                GenerationResult(
                    key=requests[i].key, text=text, input_text=rendered[i][0], params=params
                )
            )
        return results

    def _params(self, sampling: Sampling, seed: int) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model_name,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": seed,
        }

    def _free_cache(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        for name in ("model", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        self._free_cache()


def _looks_like_path(model: str) -> bool:
    """A filesystem path rather than a hub name (``owner/name`` or ``name``)."""
    return (
        model.startswith((".", "/", "~"))
        or "\\" in model
        or model.count("/") > 1
        or Path(model).suffix in {".gguf", ".safetensors", ".bin"}
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
