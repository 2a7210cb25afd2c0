"""The ``prefero`` command line: database, server, users, tokens, projects, imports."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from alembic import command
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.orm import Session, sessionmaker

from app.config import ROOT, Settings, get_settings
from app.db import engine_from_settings, make_session_factory
from app.errors import DomainError, ImportRejected
from app.generation.base import BUILTIN_MODEL, BackendError
from app.models import GenerationJob, Role
from app.observability import MULTIPROC_ENV, log_config, prepare_multiprocess_dir
from app.schemas import ExportParams, GenerationParams, JobCreate, ProjectCreate
from app.services import backup, exports, generation, imports, projects, users
from app.services.health import alembic_config
from app.worker import JobRun, backend_loader, run_worker, worker_name
from app.worker import Progress as Progress_

cli = typer.Typer(
    help="prefero: collect human preference data for RLHF.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
users_cli = typer.Typer(help="User accounts.", no_args_is_help=True)
tokens_cli = typer.Typer(help="API tokens.", no_args_is_help=True)
projects_cli = typer.Typer(help="Labeling projects.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(users_cli, name="users")
cli.add_typer(tokens_cli, name="tokens")
cli.add_typer(projects_cli, name="projects")
models_cli = typer.Typer(help="Local generation models.", no_args_is_help=True)
cli.add_typer(models_cli, name="models")

GRACEFUL_SHUTDOWN_S = 30
"""Seconds `prefero serve` waits for requests in flight after SIGTERM."""
KEEP_ALIVE_S = 75
"""``prefero serve``'s keep-alive timeout: longer than a proxy's or a client's idle timeout, so
the other side closes an idle connection first (uvicorn's default, 5 s, equals httpx's and is
far below nginx's and load balancers' 60 s: a request sent as the server closes the
connection fails with no answer, a 502 behind a proxy)."""
DEMO_DATA = ROOT / "app" / "demo" / "prompts.jsonl"
DEMO_ACCOUNTS = (
    ("admin", Role.admin),
    ("annotator1", Role.annotator),
    ("annotator2", Role.annotator),
)


@contextmanager
def _session() -> Iterator[Session]:
    engine = engine_from_settings(get_settings())
    try:
        with _session_from(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


@contextmanager
def _session_from(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose domain errors end the command with a message and exit status 1."""
    session = factory()
    try:
        yield session
    except ImportRejected as e:
        for err in e.errors or []:
            where = f"line {err['line']}" + (f", {err['field']}" if err["field"] else "")
            typer.echo(f"{where}: {err['message']}", err=True)
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    except DomainError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        session.close()


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: head). Creates the SQLite file if needed."""
    settings = get_settings()
    if settings.is_sqlite:
        settings.ensure_data_dir()
    command.upgrade(alembic_config(), revision)


@db_cli.command("current")
def db_current() -> None:
    """Show the database's current migration."""
    command.current(alembic_config(), verbose=False)


@db_cli.command("backup")
def db_backup(
    out: Annotated[Path, typer.Argument(help="Backup file to write (replaced if it exists).")],
) -> None:
    """Write a consistent snapshot of the database to OUT while the service keeps running:
    SQLite's online backup API, or pg_dump --format=custom for PostgreSQL."""
    try:
        result = backup.backup_database(get_settings().database_url, out=out)
    except DomainError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"backed up the {result.kind} database to {result.path} "
        f"({result.bytes:,} bytes, {result.seconds:.1f} s)"
    )


@db_cli.command("restore")
def db_restore(
    source: Annotated[Path, typer.Argument(help="A file written by `prefero db backup`.")],
) -> None:
    """Load a backup into the configured database, which must be empty (a new PostgreSQL
    database, or no SQLite file yet). Stop the service first."""
    settings = get_settings()
    if settings.is_sqlite:
        settings.ensure_data_dir()
    try:
        result = backup.restore_database(settings.database_url, source=source)
    except DomainError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"restored {source} into the {result.kind} database (migration {result.revision})")
    if not result.at_head:
        typer.echo("the backup is older than this version: run `prefero db upgrade`", err=True)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    keep_alive: Annotated[
        int,
        typer.Option(
            min=1,
            help="Seconds an idle keep-alive connection stays open. Keep it above the idle "
            "timeout of a proxy or client in front (nginx upstream and AWS ALB: 60 s, httpx: "
            "5 s): whichever side closes first races a request sent on that connection.",
        ),
    ] = KEEP_ALIVE_S,
) -> None:
    """Serve the web app and API with uvicorn (run `prefero db upgrade` first). On SIGTERM or
    SIGINT it stops accepting connections, finishes the requests in flight (up to 30 s) and
    exits 0."""
    import uvicorn

    settings = get_settings()
    settings.get_secret_key()  # create the key once, before workers race for it
    if workers > 1:
        # Worker processes add their request metrics up in files here (GET /metrics).
        metrics_dir = settings.ensure_data_dir() / "prometheus"
        prepare_multiprocess_dir(metrics_dir)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler found at start: make that an exit with status 0 (a stop, not a crash).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=log_config(settings.log_format, log_level),
        access_log=False,  # the app writes its own access lines (with request ids)
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=keep_alive,
        # A worker that starts slowly (a busy host) is not killed as hung after 5 s.
        timeout_worker_healthcheck=60,
    )


def _stopped(signum: int, _frame: object) -> None:
    raise SystemExit(0)


@users_cli.command("create")
def users_create(
    username: str,
    role: Annotated[Role, typer.Option(help="admin or annotator.")] = Role.annotator,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a user. Without --password-stdin the account can only use API tokens."""
    from app.schemas import UserCreate

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    try:
        data = UserCreate(username=username, role=role, password=password)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    with _session() as s:
        user = users.create_user(s, username=data.username, role=data.role, password=data.password)
        typer.echo(f"created {user.role.value} {user.username!r} (id {user.id})")


@tokens_cli.command("create")
def tokens_create(
    username: str, name: Annotated[str, typer.Option(help="A label for the token.")] = "cli"
) -> None:
    """Create an API token; the secret is printed alone on the last line."""
    with _session() as s:
        token, secret = users.create_token(s, username=username, name=name)
        typer.echo(f"token {token.id} ({token.name}) for {username!r}; it is shown only once:")
        typer.echo(secret)


@projects_cli.command("add-member")
def projects_add_member(
    slug: str, usernames: Annotated[list[str], typer.Argument(help="One or more usernames.")]
) -> None:
    """Let users label a members-only project (`--members-only` on the project)."""
    from app.services import members

    with _session() as s:
        now = members.add_members(s, slug=slug, usernames=usernames)
    typer.echo(f"{slug}: {len(now)} member(s): {', '.join(now)}")


@projects_cli.command("remove-member")
def projects_remove_member(
    slug: str, usernames: Annotated[list[str], typer.Argument(help="One or more usernames.")]
) -> None:
    """Take users off a project's member list."""
    from app.services import members

    with _session() as s:
        now = members.remove_members(s, slug=slug, usernames=usernames)
    typer.echo(f"{slug}: {len(now)} member(s): {', '.join(now)}")


@projects_cli.command("create")
def projects_create(
    slug: Annotated[str, typer.Option(help="URL name, e.g. helpful-v1.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    k: Annotated[int, typer.Option("--k", help="Completions ranked per task (2-9).")] = 4,
    overlap: Annotated[int, typer.Option(help="Annotations wanted per prompt.")] = 3,
    guidelines: Annotated[
        Path | None, typer.Option(help="Markdown file with labeling guidelines.")
    ] = None,
    members_only: Annotated[
        bool, typer.Option(help="Only members (`projects add-member`) may label.")
    ] = False,
) -> None:
    """Create a labeling project."""
    try:
        data = ProjectCreate(
            slug=slug,
            name=name,
            completions_per_task=k,
            overlap=overlap,
            guidelines=guidelines.read_text() if guidelines else "",
            members_only=members_only,
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    with _session() as s:
        project = projects.create_project(s, data=data)
        typer.echo(
            f"created project {project.slug!r} (K={project.completions_per_task}, "
            f"overlap={project.overlap})"
        )


@models_cli.command("prepare")
def models_prepare() -> None:
    """Convert the built-in model to its cached safetensors copy now (about 20 s, once), so
    that the first generation job starts at once."""
    from app.generation.builtin import builtin_model_dir  # loads torch: CLI only

    try:
        path = builtin_model_dir(get_settings().data_dir / "models")
    except BackendError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{BUILTIN_MODEL} ready in {path}")


@cli.command("import")
def import_file(
    file: Annotated[str, typer.Argument(help="JSONL / JSON array / HH-RLHF file, '-' for stdin.")],
    project: Annotated[str, typer.Option(help="Project slug.")],
) -> None:
    """Import prompts and completions (same parser and rules as the API)."""
    settings = get_settings()
    with _session() as s:
        if file == "-":
            source = sys.stdin.buffer
            result = imports.import_prompts(
                s, project_slug=project, source=source, max_bytes=settings.max_import_bytes
            )
        else:
            with open(file, "rb") as source:
                result = imports.import_prompts(
                    s, project_slug=project, source=source, max_bytes=settings.max_import_bytes
                )
    typer.echo(json.dumps(result.model_dump()))


@cli.command("export")
def export_file(
    project: Annotated[str, typer.Option(help="Project slug.")],
    format: Annotated[str, typer.Option(help="pairs, rankings, consensus or hh.")] = "pairs",
    out: Annotated[
        str, typer.Option(help="Output file ('-': standard output); *.parquet writes Parquet.")
    ] = "-",
    file: Annotated[
        str | None, typer.Option(help="jsonl or parquet (default: from --out's extension).")
    ] = None,
    split: Annotated[str, typer.Option(help="all, train or test (by prompt).")] = "all",
    test_fraction: Annotated[float, typer.Option(help="Share of prompts in test.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
    ties: Annotated[str, typer.Option(help="pairs: drop, or keep (margin 0).")] = "drop",
    min_agreement: Annotated[
        float | None, typer.Option(help="Keep prompts whose annotators agree at least this.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only annotations created after this ISO 8601 time.")
    ] = None,
    prompt_format: Annotated[str, typer.Option(help="auto, or chat (message lists).")] = "auto",
) -> None:
    """Export annotations (same service and rules as GET /api/v1/projects/SLUG/export)."""
    kind = file or ("parquet" if out.endswith(".parquet") else "jsonl")
    try:
        params = ExportParams(
            format=format,  # type: ignore[arg-type]
            file=kind,  # type: ignore[arg-type]
            split=split,  # type: ignore[arg-type]
            test_fraction=test_fraction,
            seed=seed,
            ties=ties,  # type: ignore[arg-type]
            min_agreement=min_agreement,
            since=since,  # type: ignore[arg-type]
            prompt_format=prompt_format,  # type: ignore[arg-type]
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if out == "-" and params.file == "parquet":
        typer.echo("error: Parquet needs a file: --out FILE.parquet", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    started = time.monotonic()
    with _session() as s:
        export = exports.open_export(
            s, project_slug=project, params=params, secret=settings.get_secret_key()
        )
        if out == "-":
            stats = _write_export(export, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            target = Path(out)
            part = target.with_name(target.name + ".part")  # no half-written FILE on failure
            try:
                with part.open("wb") as f:
                    stats = _write_export(export, f)
                part.replace(target)
            finally:
                part.unlink(missing_ok=True)
    typer.echo(
        f"exported {stats.rows} {params.format} rows ({stats.annotations} annotations, "
        f"{stats.prompts} prompts) to {out} in {time.monotonic() - started:.1f} s",
        err=True,
    )


def _write_export(export: exports.Export, out: BinaryIO) -> exports.ExportStats:
    """Write the export, showing the rows written so far on a terminal's standard error."""
    if export.params.file == "parquet" or not sys.stderr.isatty():
        return export.write(out)
    shown = time.monotonic()
    for chunk in export.chunks():
        out.write(chunk)
        if time.monotonic() - shown >= 1.0:
            typer.echo(f"\r{export.stats.rows:,} rows…", err=True, nl=False)
            shown = time.monotonic()
    typer.echo("\r", err=True, nl=False)
    return export.stats


@cli.command()
def worker(
    once: Annotated[bool, typer.Option(help="Exit when no job is left.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between looks for new jobs.")] = 1.0,
) -> None:
    """Run generation jobs (several workers may run at once, on any hosts)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    engine = engine_from_settings(settings)
    try:
        run_worker(settings, make_session_factory(engine), poll_s=poll, once=once)
    finally:
        engine.dispose()


@cli.command()
def generate(
    project: Annotated[str, typer.Option(help="Project slug.")],
    model: Annotated[
        list[str] | None,
        typer.Option(help=f"Model (repeat to cycle several). Default: {BUILTIN_MODEL}."),
    ] = None,
    backend: Annotated[str, typer.Option(help="transformers or openai.")] = "transformers",
    k: Annotated[int | None, typer.Option("--k", help="Completions per prompt.")] = None,
    temperature: Annotated[
        list[float] | None, typer.Option(help="Repeat for one per completion slot.")
    ] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 256,
    seed: Annotated[int, typer.Option(help="Slot i uses seed + i.")] = 0,
    detach: Annotated[bool, typer.Option(help="Only queue the job and print its id.")] = False,
) -> None:
    """Generate K completions per prompt. Runs here when no worker is running."""
    try:
        data = JobCreate(
            model=model or BUILTIN_MODEL,
            backend=backend,  # type: ignore[arg-type]
            k=k,
            params=GenerationParams(
                temperature=temperature or 0.7,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
            ),
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    settings = get_settings()
    engine = engine_from_settings(settings)
    factory = make_session_factory(engine)
    try:
        with _session_from(factory) as s:
            job = generation.create_job(s, project_slug=project, data=data)
            typer.echo(f"job {job.id}: {job.k} completions × {job.total} prompts ({job.backend})")
            if detach:
                return
            workers = generation.live_workers(s)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ) as bar:
            task = bar.add_task("generating", total=job.total)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            if workers:
                final = _follow(factory, job.id, progress)
            else:
                final = _run_here(settings, factory, job.id, progress)
        typer.echo(
            f"job {final.id} {final.status.value}: {final.completions_created} completions, "
            f"{final.duplicates_dropped} duplicates dropped"
            + (f"; {final.message}" if final.message else "")
        )
        if final.status.value != "succeeded":
            raise typer.Exit(1)
    finally:
        engine.dispose()


def _follow(factory: sessionmaker[Session], job_id: int, progress: Progress_) -> GenerationJob:
    """Show a worker's progress on the job until it finishes."""
    while True:
        with factory() as s:
            job = generation.get_job(s, job_id=job_id)
        progress(job.done, job.total)
        if job.status.value in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)


def _run_here(
    settings: Settings, factory: sessionmaker[Session], job_id: int, progress: Progress_
) -> GenerationJob:
    name = f"cli:{worker_name()}"
    with factory() as s:
        claimed = generation.claim_job(s, worker=name, job_id=job_id)
    if claimed is not None:
        try:
            JobRun(factory, job_id, name, backend_loader(settings), progress=progress).run()
        except KeyboardInterrupt:  # Ctrl-C: give the job back (saved batches stay) and stop
            with factory() as s:
                generation.release_job(s, job_id=job_id, worker=name)
            typer.echo(f"\ninterrupted: job {job_id} is queued again for `prefero worker`")
            raise typer.Exit(130) from None
    with factory() as s:
        return generation.get_job(s, job_id=job_id)


DEMO_GENERATION = JobCreate(
    model=BUILTIN_MODEL,
    k=4,
    params=GenerationParams(temperature=[0.3, 0.7, 1.0, 1.2], max_new_tokens=128),
)


@cli.command("seed-demo")
def seed_demo(
    generate: Annotated[
        bool, typer.Option(help="Queue generation of 4 completions per prompt (built-in model).")
    ] = True,
) -> None:
    """Create an admin, two annotators and a demo project with prompts (idempotent)."""
    settings = get_settings()
    lines, secret = [], None
    with _session() as s:
        for username, role in DEMO_ACCOUNTS:
            try:
                users.get_user(s, username=username)
                lines.append(f"  {role.value:9} {username:10} (exists; password unchanged)")
            except DomainError:
                password = secrets.token_urlsafe(9)
                users.create_user(s, username=username, role=role, password=password)
                lines.append(f"  {role.value:9} {username:10} password: {password}")
                if role == Role.admin:
                    _, secret = users.create_token(s, username=username, name="demo")
        try:
            projects.get_project(s, slug="demo")
        except DomainError:
            guidelines = (DEMO_DATA.parent / "guidelines.md").read_text()
            projects.create_project(
                s,
                data=ProjectCreate(
                    slug="demo", name="Demo: helpful assistant", guidelines=guidelines
                ),
            )
        with DEMO_DATA.open("rb") as f:
            result = imports.import_prompts(
                s, project_slug="demo", source=f, max_bytes=settings.max_import_bytes
            )
        job = None
        if generate and not generation.list_jobs(s, project_slug="demo", limit=1):
            job = generation.create_job(s, project_slug="demo", data=DEMO_GENERATION)
    typer.echo("demo accounts:")
    for line in lines:
        typer.echo(line)
    typer.echo(f"demo project 'demo': {result.created} prompts added, {result.skipped} present")
    if job is not None:
        typer.echo(
            f"generation job {job.id} queued: 4 completions × {job.total} prompts "
            f"with {BUILTIN_MODEL} (run `prefero worker`)"
        )
    typer.echo("label in the browser at /label/demo (log in as annotator1 or annotator2)")
    if secret:
        typer.echo(f"admin API token (shown once): {secret}")
    else:
        typer.echo("more API tokens: prefero tokens create admin")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
