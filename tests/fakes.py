"""A deterministic in-process generation backend for worker and service tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.generation import BackendError, GenerationRequest, GenerationResult


@dataclass
class FakeBackend:
    """Answers ``"<model> says <last user message> (t=<temperature>, seed=<seed>)"``.

    ``answer`` overrides the text (return None to fail that request); ``calls`` records the
    requests of every ``generate`` call.
    """

    model_name: str = "fake"
    backend: str = "transformers"
    answer: Callable[[GenerationRequest], str | None] | None = None
    calls: list[list[GenerationRequest]] = field(default_factory=list)
    closed: bool = False

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            last = next(m["content"] for m in reversed(r.messages) if m["role"] == "user")
            s = r.sampling
            text = (
                self.answer(r)
                if self.answer
                else f"{self.model_name} says {last} (t={s.temperature}, seed={s.seed})"
            )
            out.append(
                GenerationResult(
                    key=r.key,
                    text=text,
                    input_text=json.dumps(r.messages),
                    params={"model": self.model_name, **s.as_params(), "finish_reason": "stop"},
                    error=None if text is not None else "fake failure",
                )
            )
        return out

    def close(self) -> None:
        self.closed = True


def fake_loader(**by_model: FakeBackend) -> Callable[[str, str], FakeBackend]:
    def load(backend: str, model: str) -> FakeBackend:
        if model not in by_model:
            raise BackendError(f"cannot load model {model!r}: not found")
        b = by_model[model]
        b.backend = backend
        return b

    return load
