"""Generation backends (worker side). Heavy libraries (torch, transformers, httpx) are loaded
only when a backend is created, so the web app can import the shared types cheaply."""

from __future__ import annotations

from app.generation.base import (
    BUILTIN_MODEL,
    Backend,
    BackendError,
    GenerationRequest,
    GenerationResult,
    Sampling,
)

BACKENDS = ("transformers", "openai")

__all__ = [
    "BACKENDS",
    "BUILTIN_MODEL",
    "Backend",
    "BackendError",
    "GenerationRequest",
    "GenerationResult",
    "Sampling",
    "load_backend",
]


def load_backend(
    backend: str,
    model: str,
    *,
    cache_dir: str,
    threads: int = 0,
    openai_base_url: str = "",
    openai_api_key: str = "",
    openai_max_concurrency: int = 8,
    openai_timeout_s: float = 60.0,
) -> Backend:
    """Create a backend for ``model``; raises :class:`BackendError` with a clear message."""
    if backend == "transformers":
        from app.generation.hf import TransformersBackend  # torch is loaded only here

        return TransformersBackend(model, cache_dir=cache_dir, threads=threads)
    if backend == "openai":
        from app.generation.openai import OpenAIBackend

        return OpenAIBackend(
            model,
            base_url=openai_base_url,
            api_key=openai_api_key,
            max_concurrency=openai_max_concurrency,
            timeout_s=openai_timeout_s,
        )
    raise BackendError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
