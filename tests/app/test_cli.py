"""The ``prefero`` CLI, in-process (typer's CliRunner) and once through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from app.cli import cli
from app.config import get_settings
from tests.conftest import create_database

runner = CliRunner()


@pytest.fixture(params=["sqlite", "postgresql"])
def cli_env(request, tmp_path, monkeypatch):
    url, drop = create_database(request.param, tmp_path)
    monkeypatch.setenv("PREFERO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PREFERO_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    drop()


def run(*args: str, input: str | None = None, code: int = 0):
    result = runner.invoke(cli, list(args), input=input)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def scalar(url: str, sql: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return c.exec_driver_sql(sql).scalar_one()
    finally:
        engine.dispose()


def test_full_admin_flow(cli_env, tmp_path):
    run("db", "upgrade")
    run("users", "create", "root", "--role", "admin", "--password-stdin", input="s3cret-password\n")
    out = run("tokens", "create", "root", "--name", "laptop").stdout
    token = out.strip().splitlines()[-1]
    assert token.startswith("pf_")
    run(
        "projects", "create", "--slug", "helpful", "--name", "Helpful", "--k", "3", "--overlap", "2"
    )

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        json.dumps({"id": "a", "prompt": "Hi", "completions": ["x", "y", "z"]})
        + "\n"
        + json.dumps({"id": "b", "prompt": [{"role": "user", "content": "Yo"}]})
        + "\n"
    )
    result = json.loads(run("import", str(data), "--project", "helpful").stdout)
    assert result["created"] == 2
    assert result["completions_created"] == 3
    again = json.loads(run("import", str(data), "--project", "helpful").stdout)
    assert (again["created"], again["skipped"]) == (0, 2)
    assert scalar(cli_env, "SELECT count(*) FROM prompt") == 2


def test_members_only_project_and_members(cli_env):
    run("db", "upgrade")
    run("users", "create", "ann")
    run("users", "create", "bob")
    run("projects", "create", "--slug", "secret", "--name", "Secret", "--members-only")
    assert "2 member(s): ann, bob" in run("projects", "add-member", "secret", "ann", "bob").stdout
    run("projects", "add-member", "secret", "ann")  # already a member: no error
    assert "1 member(s): bob" in run("projects", "remove-member", "secret", "ann").stdout
    result = run("projects", "add-member", "secret", "nobody", code=1)
    assert "nobody" in result.stderr
    assert scalar(cli_env, "SELECT count(*) FROM project_member") == 1
    assert scalar(cli_env, "SELECT count(*) FROM project WHERE members_only") == 1


def test_bad_import_exits_1_with_line_numbers_and_writes_nothing(cli_env, tmp_path):
    run("db", "upgrade")
    run("projects", "create", "--slug", "p", "--name", "P")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{nope\n')
    result = run("import", str(bad), "--project", "p", code=1)
    assert "line 2, prompt: must not be empty" in result.stderr
    assert "line 3: invalid JSON" in result.stderr
    assert "nothing was written" in result.stderr
    assert scalar(cli_env, "SELECT count(*) FROM prompt") == 0


def test_errors_are_clear(cli_env):
    run("db", "upgrade")
    assert "not found" in run("tokens", "create", "ghost", code=1).stderr
    assert "error:" in run("projects", "create", "--slug", "Bad Slug", "--name", "x", code=2).stderr
    run("users", "create", "dup")
    assert "already exists" in run("users", "create", "dup", code=1).stderr
    assert (
        "error:" in run("users", "create", "u2", "--password-stdin", input="short\n", code=2).stderr
    )


def test_seed_demo_is_idempotent(cli_env):
    run("db", "upgrade")
    first = run("seed-demo").stdout
    assert "password:" in first
    second = run("seed-demo").stdout
    assert "password unchanged" in second
    assert scalar(cli_env, 'SELECT count(*) FROM "user"') == 3
    assert scalar(cli_env, "SELECT count(*) FROM project") == 1
    assert scalar(cli_env, "SELECT count(*) FROM prompt") >= 5


def test_console_script(tmp_path):
    env = {**os.environ, "PREFERO_DATA_DIR": str(tmp_path)}
    env.pop("PREFERO_DATABASE_URL", None)
    bin_dir = Path(sys.executable).parent

    def sh(*args: str, stdin: str = "") -> str:
        done = subprocess.run(
            [str(bin_dir / "prefero"), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    assert "Usage" in sh("--help")
    sh("db", "upgrade")
    assert (tmp_path / "prefero.db").exists()
    sh("users", "create", "admin", "--role", "admin")
    token = sh("tokens", "create", "admin").splitlines()[-1]
    assert token.startswith("pf_")
    assert " " not in token
    trainer = subprocess.run(
        [str(bin_dir / "prefero-train"), "--help"], capture_output=True, text=True, check=True
    )
    assert "prefero-train" in trainer.stdout


def test_generate_runs_in_the_foreground_without_a_worker(cli_env, tmp_path):
    from tests.tiny_models import build_tiny_chat_model

    model = build_tiny_chat_model(tmp_path / "tiny")
    run("db", "upgrade")
    run("projects", "create", "--slug", "g", "--name", "G", "--k", "2")
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"id": str(i), "prompt": f"hi {i}"}) + "\n" for i in range(3))
    )
    run("import", str(data), "--project", "g")
    out = run(
        "generate",
        "--project",
        "g",
        "--model",
        str(model),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.5",
        "--temperature",
        "1.0",
    ).stdout
    assert "job 1 succeeded" in out
    assert (
        scalar(cli_env, "SELECT count(*) FROM completion")
        + scalar(cli_env, "SELECT duplicates_dropped FROM generation_job")
        == 6
    )
    assert scalar(cli_env, "SELECT count(DISTINCT model) FROM completion") == 1
    detached = run("generate", "--project", "g", "--detach").stdout
    assert detached.startswith("job 2:")
    assert scalar(cli_env, "SELECT count(*) FROM generation_job WHERE status = 'queued'") == 1
    failed = run("generate", "--project", "g", "--model", str(tmp_path / "missing"), code=1)
    assert "failed" in failed.stdout
    assert "cannot load model" in failed.stdout


def test_export_writes_jsonl_parquet_and_stdout(cli_env, tmp_path):
    from sqlalchemy.orm import Session

    from app.models import Prompt
    from tests.factories import make_annotation, make_user

    run("db", "upgrade")
    run("projects", "create", "--slug", "ex", "--name", "Ex", "--k", "3")
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Q{i}", "completions": ["a", "b", "c"]}) + "\n"
            for i in range(4)
        )
    )
    run("import", str(data), "--project", "ex")
    engine = sa.create_engine(cli_env)
    try:
        with Session(engine, expire_on_commit=False) as s:
            user = make_user(s)
            for prompt in s.scalars(sa.select(Prompt).order_by(Prompt.id)).all():
                make_annotation(s, prompt, user)
    finally:
        engine.dispose()
    out = tmp_path / "pairs.jsonl"
    result = run("export", "--project", "ex", "--out", str(out))
    assert "exported 12 pairs rows (4 annotations, 4 prompts)" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    assert rows[0]["prompt"] == "Q0"
    assert not (tmp_path / "pairs.jsonl.part").exists()
    stdout = run("export", "--project", "ex", "--format", "rankings").stdout
    assert len(stdout.splitlines()) == 4
    run("export", "--project", "ex", "--out", str(tmp_path / "x.parquet"), "--split", "train")
    train = pq.read_table(tmp_path / "x.parquet").num_rows
    run("export", "--project", "ex", "--out", str(tmp_path / "y.parquet"), "--split", "test")
    assert train + pq.read_table(tmp_path / "y.parquet").num_rows == 12
    assert "format" in run("export", "--project", "ex", "--format", "csv", code=2).stderr
    assert (
        "Parquet needs a file"
        in run("export", "--project", "ex", "--file", "parquet", code=2).stderr
    )
    assert "'nope' not found" in run("export", "--project", "nope", code=1).stderr
