"""The documentation and deployment files stay in step with the code.

- every setting is documented in the README, and so is every ``/api/v1`` route;
- the README starts with the two set-up commands;
- docker-compose.yml is valid against the Compose specification's schema, waits for a healthy
  database, migrates before serving, and has the worker and an on-demand trainer;
- the Dockerfile installs with pip only (no ``curl | sh`` downloads).

None of these tests needs a database.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from app.config import ROOT, Settings
from app.main import create_app

README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


@pytest.fixture(scope="module")
def api_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("docs")
    settings = Settings(data_dir=tmp, database_url=f"sqlite:///{tmp}/x.db", secret_key="x")
    app = create_app(settings)
    try:
        return sorted(p for p in app.openapi()["paths"] if p.startswith("/api/v1"))
    finally:
        app.state.engine.dispose()


def _mentions(text: str, path: str) -> bool:
    """``path`` appears as a whole path, not only as the prefix of a longer one."""
    return re.search(rf"(?<![\w/{{}}]){re.escape(path)}(?![\w/{{}}])", text) is not None


def _command_text(command: object) -> str:
    """A compose ``command`` (string or list) as one string."""
    if isinstance(command, list):
        return " ".join(str(part) for part in command)
    return str(command or "")


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme(readme, name):
    var = f"PREFERO_{name.upper()}"
    assert re.search(rf"\b{var}\b", readme), f"{var} is not documented in README.md"


def test_readme_starts_with_the_setup_commands(readme):
    head = "\n".join(readme.splitlines()[:40])
    assert "make demo" in head
    assert "make test" in head


def test_every_api_route_is_in_the_readme(readme, api_paths):
    assert api_paths, "the app has no /api/v1 routes?"
    missing = [p for p in api_paths if not _mentions(readme, p)]
    assert not missing, f"routes missing from README.md: {missing}"


def test_every_api_route_is_in_docs_api(api_paths):
    doc = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [p for p in api_paths if not _mentions(doc, p)]
    assert not missing, f"routes missing from docs/api.md: {missing}"


def test_compose_has_db_and_app(compose):
    services = compose.get("services") or {}
    assert {"db", "app"} <= set(services)


def test_compose_db_has_a_healthcheck(compose):
    db = compose["services"]["db"]
    test = _command_text(db.get("healthcheck", {}).get("test"))
    assert "pg_isready" in test


def test_compose_app_waits_for_a_healthy_db(compose):
    depends_on = compose["services"]["app"].get("depends_on")
    assert isinstance(depends_on, dict), "app.depends_on must use the long form with a condition"
    assert depends_on["db"]["condition"] == "service_healthy"


def test_compose_app_migrates_before_serving(compose):
    app = compose["services"]["app"]
    command = _command_text(app.get("command"))
    assert "prefero db upgrade" in command
    assert "prefero serve" in command
    assert command.index("prefero db upgrade") < command.index("prefero serve")
    # `a; b` would serve an unmigrated database; `a && b` does not.
    between = command[command.index("prefero db upgrade") : command.index("prefero serve")]
    assert "&&" in between


def test_compose_app_points_at_the_db_service(compose):
    env = compose["services"]["app"].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    url = str(env.get("PREFERO_DATABASE_URL", ""))
    assert url.startswith("postgresql+psycopg://")
    assert "@db:5432/" in url


def test_compose_file_matches_the_compose_schema(compose):
    # The Compose specification's JSON schema, as shipped by docker-compose 1.29.2 (Apache-2.0;
    # tests/fixtures/compose/LICENSE): no Docker engine runs here to `docker compose config`.
    schema_path = ROOT / "tests" / "fixtures" / "compose" / "compose_spec.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


def test_compose_services_use_images_built_here_or_pinned(compose):
    for name, service in compose["services"].items():
        image = str(service.get("image", ""))
        if "build" in service or image.startswith("prefero:"):
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: pin a tag, not {image!r}"
        assert not image.endswith(":latest"), f"{name}: pin a tag, not {image!r}"


def test_compose_app_serves_several_workers_with_a_healthcheck(compose):
    app = compose["services"]["app"]
    workers = re.search(r"--workers (\d+)", _command_text(app.get("command")))
    assert workers, "serve --workers N"
    assert int(workers.group(1)) >= 2
    assert "/readyz" in _command_text(app["healthcheck"]["test"])
    # Longer than the server's own drain time (timeout_graceful_shutdown in app/cli.py).
    assert int(str(app["stop_grace_period"]).rstrip("s")) > 30


def test_compose_worker_shares_the_app_settings(compose):
    worker = compose["services"]["worker"]
    assert _command_text(worker["command"]) == "prefero worker"
    assert (
        _env(worker)["PREFERO_DATABASE_URL"]
        == _env(compose["services"]["app"])["PREFERO_DATABASE_URL"]
    )
    assert worker["depends_on"]["app"]["condition"] == "service_healthy"


def test_compose_trainer_runs_only_on_demand(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["profiles"] == ["trainer"]  # `docker compose up` leaves it out
    assert trainer["entrypoint"] == ["prefero-train"]
    assert "PREFERO_TOKEN" in _env(trainer)  # reads exports from the app's URL


def test_dockerfile_installs_with_pip_only():
    text = DOCKERFILE.read_text(encoding="utf-8")
    # Join continuation lines so a `curl ... \` + `| sh` split over lines is still one command.
    joined = re.sub(r"\\\n", " ", text)
    instructions = [ln for ln in joined.splitlines() if not ln.lstrip().startswith("#")]
    for line in instructions:
        assert not re.search(r"\b(curl|wget)\b.*\|\s*(ba|z)?sh\b", line), line
        assert not re.search(r"\b(curl|wget)\b.*https?://", line), f"not via pip: {line}"
        assert not re.match(r"\s*ADD\s+https?://", line), f"not via pip: {line}"
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert re.search(r"pip install[^\n]*-e \.", text), "the package must be installed in place"
    assert re.search(r"^USER (?!root\b)\S+", text, re.MULTILINE), "the image must not run as root"


def test_dockerignore_keeps_local_state_out():
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".prefero", ".git"} <= entries


def test_compose_worker_runs_jobs_after_the_app_migrated(compose):
    worker = compose["services"]["worker"]
    assert worker["command"] == ["prefero", "worker"]
    assert worker["depends_on"]["app"]["condition"] == "service_healthy"
    assert (
        worker["environment"]["PREFERO_DATABASE_URL"]
        == (compose["services"]["app"]["environment"]["PREFERO_DATABASE_URL"])
    )
