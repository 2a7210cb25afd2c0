"""Schemathesis against the service's own OpenAPI schema (``app.openapi()``), in process over
ASGI, as an admin and as an annotator, on SQLite and PostgreSQL: no 5xx, and every response
(status code, content type, headers, body) conforms to what the schema declares.

One test per database × role walks every operation of the schema (what one operation creates
or changes, the next ones see). Cases are valid (positive) and invalid (negative) requests;
half of them take their path parameters from seeded objects (a project with prompts
and an annotation, users, tokens, a generation job, open leases), so the fuzzer reaches existing
objects, not only 404s. Deterministic (``derandomize``) and bounded (``MAX_EXAMPLES``).

Schemathesis' pytest plugin (``schema.parametrize``) does not run on pytest 9, so the cases
come from ``APIOperation.as_strategy`` under a plain hypothesis ``@given``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.main import create_app
from app.models import ApiToken, Role
from app.schemas import JobCreate
from app.services import generation, tasks
from tests.factories import make_annotation, make_project, make_prompt, make_token, make_user

MAX_EXAMPLES = 20
# Not schemathesis' positive_data_acceptance / negative_data_rejection: rules the schema cannot
# express (a ranking must list the lease's completions, ties=keep needs format=pairs) reject
# schema-valid requests with 422, and pydantic's lax mode accepts some schema-invalid values
# on purpose (ids sent as strings).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
METHODS = {"get", "post", "put", "patch", "delete"}


def _operations() -> list[str]:
    app = create_app(
        Settings(data_dir=Path("/nonexistent"), database_url="sqlite://", secret_key="x")
    )
    paths = app.openapi()["paths"]
    return [f"{m.upper()} {p}" for p, item in paths.items() for m in item if m in METHODS]


OPERATIONS = _operations()


@pytest.fixture(params=["admin", "annotator"])
def role(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def seeded(session: Session, role: str) -> dict[str, Any]:
    """Objects the path parameters can name, and the caller's token."""
    admin = make_user(session, role=Role.admin, username="fuzz-admin")
    annotator = make_user(session, username="fuzz-annotator")
    other = make_user(session, username="fuzz-other")
    project = make_project(session, slug="fuzzed", name="Fuzzed")
    prompts = [make_prompt(session, project) for _ in range(4)]
    make_annotation(session, prompts[0], other)
    make_token(session, other, name="victim")
    caller = admin if role == "admin" else annotator
    token = make_token(session, caller, name="fuzz")
    leases: list[int] = []
    for _ in range(2):  # two open leases of the annotator
        task = tasks.next_task(session, slug=project.slug, user=annotator, exclude=leases)
        assert task is not None
        leases.append(task.lease_id)
    job = generation.create_job(session, project_slug=project.slug, data=JobCreate(), actor=admin)
    own = session.scalar(select(ApiToken.id).where(ApiToken.name == "fuzz"))
    return {
        "token": token,
        "own_token_id": own,
        "values": {
            "slug": [project.slug],
            "prompt_id": [p.id for p in prompts],
            "username": [admin.username, annotator.username, other.username],
            "token_id": list(session.scalars(select(ApiToken.id).where(ApiToken.id != own))),
            "job_id": [job.id],
            "lease_id": leases,
        },
    }


@pytest.fixture
def api_schema(app) -> Iterator[Any]:
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    schemathesis_asgi.shutdown_lifespans()


def cases(operation: Any, values: dict[str, list[Any]]) -> st.SearchStrategy:
    names = [p.name for p in operation.path_parameters]
    known = {n: st.sampled_from(values[n]) for n in names if values.get(n)}
    out = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        out.append(operation.as_strategy(mode))
        if known and len(known) == len(names):
            out.append(
                st.fixed_dictionaries(known).flatmap(
                    lambda pp, mode=mode: operation.as_strategy(mode, path_parameters=pp)
                )
            )
    return st.one_of(out)


def test_api_conforms_to_its_schema(api_schema, seeded):
    """Every operation in turn, against one seeded database (what one operation creates or
    changes, the next ones see); all failures are reported together."""
    headers = {"Authorization": f"Bearer {seeded['token']}"}
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert sorted(op.label for op in operations) == sorted(OPERATIONS)
    failures = []
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases(operation, seeded["values"]))
        def run(case):
            params = case.path_parameters or {}
            if params.get("token_id") == seeded["own_token_id"]:
                params["token_id"] = seeded["values"]["token_id"][0]  # keep the caller's token
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            statuses[operation.label][response.status_code] += 1  # noqa: B023 - called at once

        try:
            run()
        except Exception as exc:
            failures.append(f"{operation.label}:\n{exc}")
    total = sum(sum(c.values()) for c in statuses.values())
    print(f"\n{total} requests over {len(operations)} operations")  # pytest -s shows them
    for label, counts in statuses.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(failures)


# Findings of the fuzzer, kept as plain regression tests.


@pytest.mark.parametrize("lease_id", [str(2**63), str(10**30), "0", "-1", "x"])
def test_exclude_ids_beyond_bigint_are_422_not_500(client, session, lease_id):
    user = make_user(session)
    project = make_project(session)
    headers = {"Authorization": f"Bearer {make_token(session, user)}"}
    r = client.get(
        f"/api/v1/projects/{project.slug}/tasks/next",
        params={"exclude": lease_id},
        headers=headers,
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"].startswith("query.exclude")


@pytest.mark.parametrize(
    "body",
    [
        {"ranking": [[True]]},
        {"ranking": [["1"]], "likert": {"1": True}},
        {"ranking": [["1"]], "strength": True},
        {"ranking": [["1"]], "duration_ms": False},
    ],
)
def test_json_booleans_are_not_read_as_numbers(client, session, body):
    user = make_user(session)
    project = make_project(session)
    headers = {"Authorization": f"Bearer {make_token(session, user)}"}
    task = tasks.next_task(session, slug=project.slug, user=user, exclude=[])
    assert task is None  # no prompts: the body is rejected before the lease is looked up
    r = client.post("/api/v1/leases/1/submit", json=body, headers=headers)
    assert r.status_code == 422, r.text
    assert "not true or false" in r.text


@pytest.mark.parametrize("body", [b"\xff\xfe{", b'{"name": "\xc3'])
def test_undecodable_json_bodies_are_a_documented_400(client, session, app, body):
    headers = {
        "Authorization": f"Bearer {make_token(session, make_user(session, role=Role.admin))}"
    }
    r = client.post(
        "/api/v1/projects", content=body, headers={**headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert "400" in app.openapi()["paths"]["/api/v1/projects"]["post"]["responses"]
