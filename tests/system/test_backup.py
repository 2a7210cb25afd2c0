"""``prefero db backup`` while a writer keeps inserting, then ``prefero db restore`` into a
fresh database, on SQLite and PostgreSQL:

- the restored database is at the migrations' head and matches the models (``alembic check``);
- it is one consistent snapshot: every prompt has all the completions written in its
  transaction, and the prompts are exactly those the source had up to some instant (a prefix
  of the writer's inserts);
- its rows are identical to the source's (per-table row counts and SHA-256 checksums; for the
  tables the writer touched, up to the snapshot's last prompt);
- a restore into a non-empty database is refused and changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import Base, make_engine
from app.errors import BackupFailed
from app.models import Annotation, AnnotationStatus, Completion, Prompt, Role
from app.services import backup
from app.services.health import alembic_config, readiness
from bench._support import prefero_command
from tests.conftest import create_database, migrate
from tests.factories import make_project, make_token, make_user

pytestmark = pytest.mark.slow

SEED_PROMPTS = 300
WRITER_TABLES = {"prompt", "completion"}


def seed(url: str) -> int:
    engine = make_engine(url)
    with Session(engine) as s:
        admin = make_user(s, role=Role.admin)
        make_token(s, admin)
        annotators = [make_user(s) for _ in range(3)]
        project = make_project(s, completions_per_task=2)
        prompts = []
        for i in range(SEED_PROMPTS):
            prompt = Prompt(
                project_id=project.id,
                external_id=f"seed{i}",
                messages=[{"role": "user", "content": f"seed {i} ✓ 日本語"}],
                metadata_={"i": i},
                annotation_count=1 if i % 3 == 0 else 0,
            )
            prompt.completions = [
                Completion(external_id=f"c{j}", text=f"completion {j} of {i}", model="m")
                for j in range(2)
            ]
            prompts.append(prompt)
        s.add_all(prompts)
        s.flush()
        s.add_all(
            Annotation(
                project_id=project.id,
                prompt_id=p.id,
                user_id=annotators[i % 3].id,
                status=AnnotationStatus.submitted,
                ranking=[[c.id] for c in p.completions],
                display_order=[c.id for c in p.completions],
            )
            for i, p in enumerate(prompts)
            if i % 3 == 0
        )
        s.commit()
        project_id = project.id
    engine.dispose()
    return project_id


class Writer(threading.Thread):
    """Inserts one prompt with two completions per transaction until stopped."""

    def __init__(self, url: str, project_id: int) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        self.project_id = project_id
        self.stop = threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with Session(self.engine) as s:
                    n = self.written
                    prompt = Prompt(
                        project_id=self.project_id,
                        external_id=f"w{n}",
                        messages=[{"role": "user", "content": f"written during backup {n}"}],
                        metadata_={},
                    )
                    prompt.completions = [
                        Completion(external_id=f"w{n}-{i}", text=f"c{i}", model="m")
                        for i in range(2)
                    ]
                    s.add(prompt)
                    s.commit()
                self.written += 1
                time.sleep(0.002)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.engine.dispose()


def checksums(url: str, *, max_prompt_id: int | None = None) -> dict[str, tuple[int, str]]:
    """Per table: (row count, SHA-256 of its rows in primary-key order). The writer's tables
    are cut at ``max_prompt_id``."""
    engine = make_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            query = select(table).order_by(*table.primary_key.columns)
            if max_prompt_id is not None and table.name == "prompt":
                query = query.where(table.c.id <= max_prompt_id)
            if max_prompt_id is not None and table.name == "completion":
                query = query.where(table.c.prompt_id <= max_prompt_id)
            digest = hashlib.sha256()
            n = 0
            for row in conn.execute(query):
                digest.update(repr(tuple(row)).encode())
                n += 1
            out[table.name] = (n, digest.hexdigest())
    engine.dispose()
    return out


def cli(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFERO_DATABASE_URL": url, "PREFERO_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [prefero_command(), "db", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_backup_during_writes_restores_an_identical_consistent_snapshot(kind, tmp_path):
    url, drop = create_database(kind, tmp_path)
    fresh_url, drop_fresh = create_database(kind, tmp_path)
    try:
        migrate(url)
        project_id = seed(url)
        writer = Writer(url, project_id)
        writer.start()
        while writer.written < 20 and writer.is_alive():
            time.sleep(0.01)
        before = writer.written
        out = tmp_path / ("backup.db" if kind == "sqlite" else "backup.pgdump")
        done = cli(url, tmp_path / "d", "backup", str(out))
        during = writer.written - before
        time.sleep(0.1)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error
        assert done.returncode == 0, done.stderr
        assert "backed up" in done.stdout
        assert during > 0, "no write happened while the backup ran"
        assert not out.with_name(out.name + ".part").exists()

        restored = cli(fresh_url, tmp_path / "d2", "restore", str(out))
        assert restored.returncode == 0, restored.stderr
        assert "restored" in restored.stdout

        # At head, and the schema matches the models.
        engine = make_engine(fresh_url)
        ready, detail, _ = readiness(engine)
        engine.dispose()
        assert ready, detail
        cfg = alembic_config()
        cfg.set_main_option("sqlalchemy.url", fresh_url.replace("%", "%%"))
        cfg.attributes["configure_logger"] = False
        command.check(cfg)

        # One consistent snapshot: whole transactions, a prefix of the writer's inserts.
        engine = make_engine(fresh_url)
        with Session(engine) as s:
            per_prompt = s.execute(
                select(Prompt.id, func.count(Completion.id))
                .outerjoin(Completion, Completion.prompt_id == Prompt.id)
                .group_by(Prompt.id)
            ).all()
            max_prompt = s.scalar(select(func.max(Prompt.id)))
            n_prompts = s.scalar(select(func.count()).select_from(Prompt))
        engine.dispose()
        print(
            f"{kind}: {during} writes while the backup ran; snapshot has {n_prompts} prompts "
            f"of {SEED_PROMPTS + writer.written} written"
        )
        assert {n for _, n in per_prompt} == {2}
        assert SEED_PROMPTS < n_prompts < SEED_PROMPTS + writer.written

        # Identical rows.
        source = checksums(url, max_prompt_id=max_prompt)
        copy = checksums(fresh_url)
        assert copy == source
        assert copy["prompt"][0] == n_prompts
        assert copy["annotation"][0] == SEED_PROMPTS // 3

        # A second restore into the now non-empty database is refused, nothing changed.
        with pytest.raises(BackupFailed, match="not empty"):
            backup.restore_database(fresh_url, source=out)
        assert checksums(fresh_url) == copy
    finally:
        drop_fresh()
        drop()


def test_restore_refuses_a_backup_of_the_other_kind(tmp_path):
    fake = tmp_path / "dump.pgdump"
    fake.write_bytes(b"PGDMP" + b"\0" * 100)
    with pytest.raises(BackupFailed, match="not a SQLite backup"):
        backup.restore_database(f"sqlite:///{tmp_path}/new.db", source=fake)
    with pytest.raises(BackupFailed, match="no such file"):
        backup.restore_database(f"sqlite:///{tmp_path}/new.db", source=tmp_path / "missing")


def test_missing_pg_dump_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_dump here
    with pytest.raises(BackupFailed, match="pg_dump is not on PATH"):
        backup.backup_database(
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", out=tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
