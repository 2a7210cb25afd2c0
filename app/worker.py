"""``prefero worker``: runs generation jobs outside the web processes.

The loop registers the worker, claims jobs (oldest first, or ones whose worker died), and runs
each in batches of prompts: build the K requests per prompt (project system prompt and
instruction template applied, sampling settings cycled over the slots), generate, drop or
regenerate duplicates, and save the batch with the job's new cursor in one transaction. A
heartbeat thread keeps the job claimed while a long batch generates and notices cancellation.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.generation import (
    Backend,
    BackendError,
    GenerationRequest,
    GenerationResult,
    Sampling,
    load_backend,
)
from app.generation.base import expand_samplings, render_messages
from app.services import generation as jobs
from app.services.generation import NewCompletion, normalise_text

log = logging.getLogger("prefero.worker")

BATCH_PROMPTS = 16
DEDUP_RETRIES = 2
HEARTBEAT_S = 10.0

BackendLoader = Callable[[str, str], Backend]
Progress = Callable[[int, int], None]


def backend_loader(settings: Settings) -> BackendLoader:
    def load(backend: str, model: str) -> Backend:
        return load_backend(
            backend,
            model,
            cache_dir=str(settings.data_dir / "models"),
            threads=settings.generation_threads,
            openai_base_url=settings.openai_base_url,
            openai_api_key=settings.openai_api_key,
            openai_max_concurrency=settings.openai_max_concurrency,
            openai_timeout_s=settings.openai_timeout_s,
        )

    return load


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_on_this_host(names: list[str]) -> list[str]:
    """Registered workers of this host whose process no longer exists (killed, crashed)."""
    host = socket.gethostname()
    dead = []
    for name in names:
        worker_host, _, pid = name.rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(name)
        except PermissionError:  # alive, owned by another user
            pass
    return dead


@dataclass
class _Slot:
    prompt_id: int
    slot: int
    messages: list[dict[str, str]]
    attempt: int = 0


@dataclass
class JobRun:
    """Runs one claimed job to the end (or until cancelled / taken over)."""

    factory: sessionmaker[Session]
    job_id: int
    worker: str
    load: BackendLoader
    batch_prompts: int = BATCH_PROMPTS
    progress: Progress | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    """Set to stop after the current batch; the job goes back to the queue."""
    _lost: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.factory() as s:
            ctx = jobs.job_context(s, job_id=self.job_id)
        job = ctx.job
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop_beat,), daemon=True)
        beat.start()
        backends: dict[str, Backend] = {}
        failure: str | None = None
        try:
            for model in dict.fromkeys(job.models):
                backends[model] = backend = self.load(job.backend, model)
                if hasattr(backend, "stop_event"):  # lets shutdown cut a long batch short
                    backend.stop_event = self.stop
            self._generate_all(ctx, backends)
        except BackendError as e:
            failure = str(e)
        except MemoryError:
            failure = "out of memory: use a smaller model or batch"
        except Exception as e:  # never let one job kill the worker
            log.exception("job %s crashed", self.job_id)
            failure = f"internal error: {type(e).__name__}: {e}"
        finally:
            stop_beat.set()
            beat.join()
            for backend in backends.values():
                backend.close()
        with self.factory() as s:
            if self.stop.is_set() and failure is None:
                jobs.release_job(s, job_id=self.job_id, worker=self.worker)
            else:
                jobs.finish_job(s, job_id=self.job_id, worker=self.worker, failure=failure)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with self.factory() as s:
                    if not jobs.worker_heartbeat(s, name=self.worker, job_id=self.job_id):
                        self._lost.set()
            except Exception:  # the database may be briefly unavailable
                log.warning("heartbeat failed", exc_info=True)

    def _generate_all(self, ctx: jobs.JobContext, backends: dict[str, Backend]) -> None:
        job = ctx.job
        samplings = expand_samplings(job.k, **job.params)
        cursor = job.cursor
        done = job.done
        if self.progress:
            self.progress(done, job.total)
        limit = 1  # a first batch of one prompt: the first task is ready sooner
        while not (self._lost.is_set() or self.stop.is_set()):
            with self.factory() as s:
                prompts = jobs.next_prompts(s, job=job, cursor=cursor, limit=limit)
            limit = self.batch_prompts
            if not prompts:
                return
            completions, dropped, errors = self._generate_batch(ctx, prompts, samplings, backends)
            if self.stop.is_set():  # shutting down: the batch may be cut short, do not save it
                return
            cursor = prompts[-1].id
            with self.factory() as s:
                saved = jobs.save_batch(
                    s,
                    job_id=self.job_id,
                    worker=self.worker,
                    completions=completions,
                    cursor=cursor,
                    prompts_done=len(prompts),
                    dropped=dropped,
                    errors=errors,
                )
            if not saved:  # cancelled, or reclaimed after a long stall: stop quietly
                return
            done += len(prompts)
            if self.progress:
                self.progress(done, job.total)

    def _generate_batch(
        self,
        ctx: jobs.JobContext,
        prompts: list[jobs.PromptToGenerate],
        samplings: list[Sampling],
        backends: dict[str, Backend],
    ) -> tuple[list[NewCompletion], int, list[dict[str, Any]]]:
        job = ctx.job
        seen = {p.id: {normalise_text(t) for t in p.existing_texts} for p in prompts}
        pending = [
            _Slot(
                p.id,
                slot,
                render_messages(
                    p.messages,
                    system_prompt=ctx.system_prompt,
                    instruction_template=ctx.instruction_template,
                ),
            )
            for p in prompts
            for slot in range(job.k)
        ]
        out: list[NewCompletion] = []
        failed: dict[int, str] = {}
        dropped = 0
        while pending:
            retry: list[_Slot] = []
            for model, backend in backends.items():
                mine = [s for s in pending if job.models[s.slot % len(job.models)] == model]
                if not mine:
                    continue
                requests = [
                    GenerationRequest(
                        key=i,
                        messages=s.messages,
                        sampling=_reseed(samplings[s.slot], s.attempt),
                    )
                    for i, s in enumerate(mine)
                ]
                results = backend.generate(requests)
                for s, result in zip(mine, results, strict=True):
                    self._take(s, result, backend, seen, out, failed, retry)
            dropped += sum(1 for s in retry if s.attempt >= DEDUP_RETRIES)
            pending = [
                _Slot(s.prompt_id, s.slot, s.messages, s.attempt + 1)
                for s in retry
                if s.attempt < DEDUP_RETRIES
            ]
        # A prompt with a failed request gets none of its completions: no half-written sets.
        out = [c for c in out if c.prompt_id not in failed]
        errors = [{"prompt_id": pid, "message": msg} for pid, msg in failed.items()]
        return out, dropped, errors

    @staticmethod
    def _take(
        slot: _Slot,
        result: GenerationResult,
        backend: Backend,
        seen: dict[int, set[str]],
        out: list[NewCompletion],
        failed: dict[int, str],
        retry: list[_Slot],
    ) -> None:
        if result.text is None or result.error:
            failed.setdefault(slot.prompt_id, result.error or "no text generated")
            return
        key = normalise_text(result.text)
        if not key or key in seen[slot.prompt_id]:
            retry.append(slot)  # empty or a duplicate: regenerate with another seed
            return
        seen[slot.prompt_id].add(key)
        out.append(
            NewCompletion(
                prompt_id=slot.prompt_id,
                slot=slot.slot,
                text=result.text,
                model=backend.model_name,
                backend=backend.backend,
                input_text=result.input_text,
                params=result.params,
            )
        )


def _reseed(sampling: Sampling, attempt: int) -> Sampling:
    """Another seed for a retry, so a duplicate is not simply generated again."""
    return sampling if attempt == 0 else replace(sampling, seed=sampling.seed + 1000 * attempt)


def run_worker(
    settings: Settings,
    factory: sessionmaker[Session],
    *,
    poll_s: float = 1.0,
    once: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Claim and run jobs until stopped (SIGTERM/SIGINT) or, with ``once``, until idle."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    name = worker_name()
    load = backend_loader(settings)
    with factory() as s:
        requeued = jobs.reap_workers(s, dead=_dead_on_this_host(jobs.worker_names(s)))
        jobs.register_worker(s, name=name)
    log.info("worker %s started (%d jobs of dead workers requeued)", name, requeued)
    try:
        last_beat = time.monotonic()
        while not stop.is_set():
            with factory() as s:
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    jobs.worker_heartbeat(s, name=name)
                    last_beat = time.monotonic()
                job = jobs.claim_job(s, worker=name)
            if job is None:
                if once:
                    return
                stop.wait(poll_s)
                continue
            log.info("job %s: %s × %s prompts", job.id, job.k, job.total)
            JobRun(factory, job.id, name, load, stop=stop).run()
    finally:
        with factory() as s:
            jobs.unregister_worker(s, name=name)
