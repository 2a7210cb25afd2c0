"""The ``prefero`` command line: database, server, users, tokens, projects, imports."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from alembic import command
from sqlalchemy.orm import Session

from app.config import ROOT, get_settings
from app.db import engine_from_settings, make_session_factory
from app.errors import DomainError, ImportRejected
from app.models import Role
from app.schemas import ProjectCreate
from app.services import imports, projects, users
from app.services.health import alembic_config

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

DEMO_DATA = ROOT / "app" / "demo" / "prompts.jsonl"


@contextmanager
def _session() -> Iterator[Session]:
    engine = engine_from_settings(get_settings())
    session = make_session_factory(engine)()
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
        engine.dispose()


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


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the web app and API with uvicorn (run `prefero db upgrade` first)."""
    import uvicorn

    get_settings().get_secret_key()  # create the key once, before workers race for it
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )


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


@projects_cli.command("create")
def projects_create(
    slug: Annotated[str, typer.Option(help="URL name, e.g. helpful-v1.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    k: Annotated[int, typer.Option("--k", help="Completions ranked per task (2-9).")] = 4,
    overlap: Annotated[int, typer.Option(help="Annotations wanted per prompt.")] = 3,
    guidelines: Annotated[
        Path | None, typer.Option(help="Markdown file with labeling guidelines.")
    ] = None,
) -> None:
    """Create a labeling project."""
    try:
        data = ProjectCreate(
            slug=slug,
            name=name,
            completions_per_task=k,
            overlap=overlap,
            guidelines=guidelines.read_text() if guidelines else "",
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


@cli.command("seed-demo")
def seed_demo() -> None:
    """Create an admin, an annotator and a demo project with prompts (idempotent)."""
    settings = get_settings()
    lines, secret = [], None
    with _session() as s:
        for username, role in (("admin", Role.admin), ("annotator", Role.annotator)):
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
    typer.echo("demo accounts:")
    for line in lines:
        typer.echo(line)
    typer.echo(f"demo project 'demo': {result.created} prompts added, {result.skipped} present")
    if secret:
        typer.echo(f"admin API token (shown once): {secret}")
    else:
        typer.echo("more API tokens: prefero tokens create admin")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
