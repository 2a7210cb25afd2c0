"""Generation jobs: the service (create, cancel, claim, save) and the worker's job runner,
with a fake backend, on SQLite and PostgreSQL (committed data, fresh database per module)."""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager

import pytest
from sqlalchemy import event, select

from app.db import make_engine, make_session_factory
from app.errors import Conflict, InvalidInput, NotFound
from app.generation.base import render_messages
from app.models import Completion, GenerationJob, JobStatus, Project, Prompt
from app.schemas import GenerationParams, JobCreate
from app.services import generation as jobs
from app.worker import JobRun
from tests.conftest import create_database, migrate
from tests.fakes import FakeBackend, fake_loader

_seq = itertools.count(1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def factory(request, tmp_path_factory):
    url, drop = create_database(request.param, tmp_path_factory.mktemp("gen"))
    migrate(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()
    drop()


def project_with_prompts(factory, n=3, **project_fields):
    with factory() as s:
        p = Project(name="G", slug=f"gen-{next(_seq)}", completions_per_task=2, **project_fields)
        s.add(p)
        s.flush()
        for i in range(n):
            s.add(
                Prompt(
                    project_id=p.id,
                    external_id=f"q{i}",
                    messages=[{"role": "user", "content": f"question {i}"}],
                )
            )
        s.commit()
        return p.slug, p.id


def new_job(factory, slug, **fields) -> int:
    with factory() as s:
        return jobs.create_job(s, project_slug=slug, data=JobCreate(model="fake", **fields)).id


def run(factory, job_id, loader, **kw) -> GenerationJob:
    with factory() as s:
        assert jobs.claim_job(s, worker="w1", job_id=job_id) is not None
    JobRun(factory, job_id, "w1", loader, **kw).run()
    with factory() as s:
        return jobs.get_job(s, job_id=job_id)


def completions(factory, project_id):
    with factory() as s:
        return list(
            s.scalars(
                select(Completion)
                .join(Prompt)
                .where(Prompt.project_id == project_id)
                .order_by(Completion.prompt_id, Completion.external_id)
            )
        )


def test_create_job_defaults_and_validation(factory):
    slug, _ = project_with_prompts(factory, n=3)
    with factory() as s:
        job = jobs.create_job(s, project_slug=slug, data=JobCreate())
        assert (job.status, job.k, job.total, job.models) == (
            JobStatus.queued,
            2,
            3,
            ["smollm2-135m-instruct"],
        )
        with pytest.raises(NotFound):
            jobs.create_job(s, project_slug="nope", data=JobCreate())
        with pytest.raises(InvalidInput, match="not in project"):
            jobs.create_job(s, project_slug=slug, data=JobCreate(prompt_ids=[999_999]))
    empty, _ = project_with_prompts(factory, n=0)
    with factory() as s, pytest.raises(InvalidInput, match="no prompts"):
        jobs.create_job(s, project_slug=empty, data=JobCreate())


def test_job_generates_k_per_prompt_and_records_everything(factory):
    slug, pid = project_with_prompts(
        factory, n=3, system_prompt="Be brief.", instruction_template="Task: {prompt}"
    )
    job_id = new_job(factory, slug, params=GenerationParams(temperature=[0.3, 1.2], seed=7))
    fake = FakeBackend()
    job = run(factory, job_id, fake_loader(fake=fake), batch_prompts=2)
    assert job.status == JobStatus.succeeded, job.message
    assert (job.done, job.total, job.completions_created) == (3, 3, 6)
    rows = completions(factory, pid)
    assert len(rows) == 6
    first = rows[0]
    assert first.external_id == f"gen-{job_id}-0"
    assert first.model == "fake"
    assert first.backend == "transformers"
    assert first.job_id == job_id
    assert first.text == "fake says Task: question 0 (t=0.3, seed=7)"
    assert rows[1].text == "fake says Task: question 0 (t=1.2, seed=8)"
    assert first.params["temperature"] == 0.3
    assert first.params["seed"] == 7
    assert '"Be brief."' in first.input_text
    assert [len(c) for c in fake.calls] == [2, 4]  # 1 prompt first, then batches of 2 (× K=2)
    assert fake.closed


def test_render_messages():
    msgs = [{"role": "user", "content": "hi {x}"}]
    assert render_messages(msgs, system_prompt="S", instruction_template="Do: {prompt}!") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Do: hi {x}!"},
    ]
    assert render_messages(msgs, instruction_template="Answer briefly.")[0]["content"] == (
        "Answer briefly.\n\nhi {x}"
    )
    with_system = [{"role": "system", "content": "own"}, *msgs]
    assert render_messages(with_system, system_prompt="S")[0]["content"] == "own"
    assert msgs == [{"role": "user", "content": "hi {x}"}]  # not modified


def test_duplicates_are_regenerated_then_dropped(factory):
    slug, pid = project_with_prompts(factory, n=1)
    with factory() as s:  # an imported completion the model will repeat
        prompt = s.scalar(select(Prompt).where(Prompt.project_id == pid))
        s.add(Completion(prompt_id=prompt.id, external_id="imp", text="Same  answer"))
        s.commit()
    job_id = new_job(factory, slug, k=3)
    answers = iter(["same answer", "unique one", " UNIQUE one ", "Same answer", "third", "x"])
    fake = FakeBackend(answer=lambda r: next(answers))
    job = run(factory, job_id, fake_loader(fake=fake))
    # slot 0: dup of imported → retry "Same answer" (dup) → retry "x"; slot 1 ok;
    # slot 2: dup of slot 1 → retry "third".
    texts = sorted(c.text for c in completions(factory, pid))
    assert texts == ["Same  answer", "third", "unique one", "x"]
    assert job.duplicates_dropped == 0
    assert job.completions_created == 3

    job2 = new_job(factory, slug, k=1)
    job = run(factory, job2, fake_loader(fake=FakeBackend(answer=lambda r: "third")))
    assert job.completions_created == 0
    assert job.duplicates_dropped == 1
    assert job.status == JobStatus.succeeded


def test_a_failed_request_writes_nothing_for_its_prompt(factory):
    slug, pid = project_with_prompts(factory, n=2)
    job_id = new_job(factory, slug)

    def answer(r):
        return (
            None
            if "question 1" in r.messages[-1]["content"] and r.sampling.seed == 1
            else (f"ok {r.messages[-1]['content']} {r.sampling.seed}")
        )

    job = run(factory, job_id, fake_loader(fake=FakeBackend(answer=answer)))
    assert job.status == JobStatus.failed
    assert job.message == "1 prompts failed; first: fake failure"
    rows = completions(factory, pid)
    assert {c.text for c in rows} == {"ok question 0 0", "ok question 0 1"}
    assert job.done == 2


def test_unknown_model_fails_the_job_with_a_clear_message(factory):
    slug, pid = project_with_prompts(factory, n=1)
    with factory() as s:
        job_id = jobs.create_job(s, project_slug=slug, data=JobCreate(model="nope")).id
    job = run(factory, job_id, fake_loader(fake=FakeBackend()))
    assert job.status == JobStatus.failed
    assert job.message == "cannot load model 'nope': not found"
    assert completions(factory, pid) == []


def test_several_models_cycle_over_slots(factory):
    slug, pid = project_with_prompts(factory, n=1)
    with factory() as s:
        job_id = jobs.create_job(s, project_slug=slug, data=JobCreate(model=["a", "b"], k=4)).id
    a, b = FakeBackend(model_name="a"), FakeBackend(model_name="b")
    run(factory, job_id, fake_loader(a=a, b=b))
    rows = completions(factory, pid)
    assert [c.model for c in rows] == ["a", "b", "a", "b"]


def test_cancel(factory):
    slug, _ = project_with_prompts(factory, n=1)
    queued = new_job(factory, slug)
    with factory() as s:
        job = jobs.cancel_job(s, job_id=queued)
        assert job.status == JobStatus.cancelled
        with pytest.raises(Conflict):
            jobs.cancel_job(s, job_id=queued)
        with pytest.raises(NotFound):
            jobs.cancel_job(s, job_id=10**9)
        assert jobs.claim_job(s, worker="w", job_id=queued) is None


def test_cancel_while_running_stops_after_the_batch(factory):
    slug, pid = project_with_prompts(factory, n=4)
    job_id = new_job(factory, slug, k=1)
    fake = FakeBackend()

    def answer(r):
        if len(fake.calls) == 1:
            with factory() as s:
                jobs.cancel_job(s, job_id=job_id)
        return f"answer {r.messages[-1]['content']}"

    fake.answer = answer
    job = run(factory, job_id, fake_loader(fake=fake), batch_prompts=2)
    assert job.status == JobStatus.cancelled
    assert len(fake.calls) == 1
    assert completions(factory, pid) == []  # the batch in flight was not saved


def test_resume_after_a_dead_worker_never_duplicates(factory):
    slug, pid = project_with_prompts(factory, n=5)
    job_id = new_job(factory, slug, k=2)
    with factory() as s:
        jobs.claim_job(s, worker="dead", job_id=job_id)
    # The dead worker saved its first batch (prompts 1-2), then vanished mid-batch.
    with factory() as s:
        job = jobs.get_job(s, job_id=job_id)
        first = jobs.next_prompts(s, job=job, cursor=0, limit=2)
        done = [
            jobs.NewCompletion(p.id, slot, f"old {p.id} {slot}", "fake", "transformers", "", {})
            for p in first
            for slot in range(2)
        ]
        assert jobs.save_batch(
            s, job_id=job_id, worker="dead", completions=done, cursor=first[-1].id, prompts_done=2
        )
    with factory() as s:  # not stale yet: nobody can take it
        assert jobs.claim_job(s, worker="w1") is None or jobs.get_job(s, job_id=job_id).worker
        s.get(GenerationJob, job_id).heartbeat_at = jobs.utcnow() - jobs.JOB_STALE * 2
        s.commit()
    with factory() as s:
        claimed = jobs.claim_job(s, worker="w1", job_id=job_id)
        assert claimed is not None
    fake = FakeBackend()
    JobRun(factory, job_id, "w1", fake_loader(fake=fake)).run()
    with factory() as s:
        job = jobs.get_job(s, job_id=job_id)
        s.expunge(job)
        # the dead worker can no longer write
        assert not jobs.save_batch(
            s, job_id=job_id, worker="dead", completions=[], cursor=10**9, prompts_done=1
        )
    assert job.status == JobStatus.succeeded
    assert job.done == 5
    rows = completions(factory, pid)
    assert len(rows) == 10
    assert len({(c.prompt_id, c.external_id) for c in rows}) == 10
    assert sum(len(c) for c in fake.calls) == 6  # only the 3 remaining prompts × 2


def test_claims_never_hand_one_job_to_two_workers(factory):
    slug, _ = project_with_prompts(factory, n=1)
    ids = {new_job(factory, slug) for _ in range(6)}
    got: list[int] = []
    lock = threading.Lock()

    def worker(name):
        while True:
            with factory() as s:
                job = jobs.claim_job(s, worker=name)
            if job is None:
                return
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j in got if j in ids) == sorted(ids)


def test_pending_generation_counts_unfinished_prompts(factory):
    slug, pid = project_with_prompts(factory, n=3)
    new_job(factory, slug)
    with factory() as s:
        assert jobs.pending_generation(s, project_id=pid) == 3


def set_job(factory, job_id, **fields) -> None:
    """Move a job along as a worker would (status, progress …)."""
    with factory() as s:
        job = s.get(GenerationJob, job_id)
        for name, value in fields.items():
            setattr(job, name, value)
        s.commit()


@contextmanager
def statements(session):
    """Counts the SQL statements the session sends while the block runs."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        seen.append(statement)

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_pending_generation_by_project_agrees_with_pending_generation(factory):
    slug, pid = project_with_prompts(factory, n=4)
    other_slug, other_pid = project_with_prompts(factory, n=2)
    idle_slug, idle_pid = project_with_prompts(factory, n=2)
    running = new_job(factory, slug)
    new_job(factory, slug, prompt_ids=None)
    set_job(factory, running, status=JobStatus.running, done=3)
    overdone = new_job(factory, other_slug)
    set_job(factory, overdone, status=JobStatus.running, done=5)  # never below zero
    new_job(factory, other_slug)
    finished = new_job(factory, idle_slug)
    set_job(factory, finished, status=JobStatus.succeeded, done=2)
    with factory() as s:
        by_project = jobs.pending_generation_by_project(s)
        for project_id in (pid, other_pid, idle_pid):
            assert by_project.get(project_id, 0) == jobs.pending_generation(
                s, project_id=project_id
            )
    assert (by_project[pid], by_project[other_pid]) == (1 + 4, 0 + 2)
    assert idle_pid not in by_project


def test_recent_jobs_are_the_newest_and_every_unfinished_one(factory):
    slug, pid = project_with_prompts(factory, n=2)
    old_running, old_done, new_a, new_b = (new_job(factory, slug) for _ in range(4))
    set_job(factory, old_running, status=JobStatus.running, done=1)
    set_job(factory, old_done, status=JobStatus.failed)
    with factory() as s:
        got = jobs.recent_jobs(s, limit=2)
        ids = [j.job.id for j in got]
        assert ids[:2] == [new_b, new_a]
        assert ids == sorted(ids, reverse=True)
        assert old_running in ids
        assert old_done not in ids
        assert all(j.unfinished for j in got[2:])
        summary = got[0]
        assert (summary.project_slug, summary.project_name, summary.job.project_id) == (
            slug,
            "G",
            pid,
        )
        everything = [j.job.id for j in jobs.recent_jobs(s, limit=10**6)]
        assert {old_running, old_done, new_a, new_b} <= set(everything)


def test_admin_overview_takes_the_same_queries_for_any_number_of_projects(factory):
    def overview_queries() -> tuple[int, jobs.AdminOverview]:
        with factory() as s, statements(s) as seen:
            overview = jobs.admin_overview(s, job_limit=5)
        return len(seen), overview

    slug, pid = project_with_prompts(factory, n=3)
    job_id = new_job(factory, slug, k=2)
    set_job(factory, job_id, status=JobStatus.running, done=1)
    before, overview = overview_queries()
    (mine,) = [p for p in overview.projects if p.project.id == pid]
    assert (mine.project.prompt_count, mine.project.completion_count) == (3, 0)
    assert mine.pending_generation == 2
    assert any(j.job.id == job_id for j in overview.jobs)
    assert overview.live_workers >= 0

    for _ in range(4):
        more_slug, _ = project_with_prompts(factory, n=2)
        new_job(factory, more_slug)
    after, overview = overview_queries()
    assert after == before, "admin_overview must not query once per project"
    assert len(overview.projects) >= 5
    assert overview.queued_jobs >= 4
