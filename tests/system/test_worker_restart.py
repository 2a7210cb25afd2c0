"""A real ``prefero worker`` with a tiny transformers model, killed with SIGKILL mid-job and
restarted: the job resumes where it stopped and no completion is written twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.db import make_engine, make_session_factory
from app.models import Completion, GenerationJob, JobStatus, Project, Prompt
from app.schemas import GenerationParams, JobCreate
from app.services import generation as jobs
from tests.conftest import create_database, migrate
from tests.tiny_models import build_tiny_chat_model

PROMPTS = 300


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request, tmp_path):
    url, drop = create_database(request.param, tmp_path)
    migrate(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    model = build_tiny_chat_model(tmp_path / "tiny")
    with factory() as s:
        p = Project(name="W", slug="w", completions_per_task=2)
        s.add(p)
        s.flush()
        s.add_all(
            Prompt(
                project_id=p.id,
                external_id=str(i),
                messages=[{"role": "user", "content": f"Say something about {i}"}],
            )
            for i in range(PROMPTS)
        )
        s.commit()
        job = jobs.create_job(
            s,
            project_slug="w",
            data=JobCreate(model=str(model), params=GenerationParams(max_new_tokens=24)),
        )
    env = {
        **os.environ,
        "PREFERO_DATABASE_URL": url,
        "PREFERO_DATA_DIR": str(tmp_path / "d"),
        "PREFERO_GENERATION_THREADS": "1",
    }
    yield factory, job.id, env
    engine.dispose()
    drop()


def start_worker(env, *args):
    exe = Path(sys.executable).parent / "prefero"
    return subprocess.Popen(
        [str(exe), "worker", "--poll", "0.1", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def job_state(factory, job_id):
    with factory() as s:
        job = s.get(GenerationJob, job_id)
        return job.status, job.done


def test_killed_worker_resumes_without_duplicates(setup):
    factory, job_id, env = setup
    proc = start_worker(env)
    deadline = time.monotonic() + 120
    try:
        while True:
            status, done = job_state(factory, job_id)
            if done >= 16 or (status != JobStatus.queued and done > 0):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    status, done_at_kill = job_state(factory, job_id)
    assert status == JobStatus.running
    assert 0 < done_at_kill < PROMPTS, "killed too late to test a resume"

    again = start_worker(env, "--once")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()
    assert b"1 jobs of dead workers requeued" in err

    with factory() as s:
        job = s.get(GenerationJob, job_id)
        assert job.status == JobStatus.succeeded, job.message
        assert job.done == PROMPTS
        n = s.scalar(select(func.count()).select_from(Completion))
        distinct = s.scalar(
            select(func.count()).select_from(
                select(Completion.prompt_id, Completion.external_id).distinct().subquery()
            )
        )
        per_prompt = set(
            s.scalars(select(func.count()).group_by(Completion.prompt_id).select_from(Completion))
        )
    assert n == distinct  # nothing written twice
    assert n == job.completions_created
    assert n + job.duplicates_dropped == 2 * PROMPTS
    assert per_prompt <= {1, 2}


def test_sigterm_hands_the_job_back_quickly_and_writes_no_partial_batch(setup):
    factory, job_id, env = setup
    proc = start_worker(env)
    deadline = time.monotonic() + 120
    try:
        while job_state(factory, job_id)[1] == 0:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.02)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - stopped_at < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    with factory() as s:
        job = s.get(GenerationJob, job_id)
        assert job.status == JobStatus.queued  # handed back, not left running
        assert job.worker is None
        n = s.scalar(select(func.count()).select_from(Completion))
        assert 0 < job.done < PROMPTS
        assert n + job.duplicates_dropped == 2 * job.done  # whole batches only
