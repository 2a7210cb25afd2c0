"""GET /api/v1/projects/{slug}/export: auth, streaming, content types, parameter errors."""

from __future__ import annotations

import io

import orjson
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.deps import WEB_SESSION_COOKIE
from app.main import create_app
from app.models import Role
from app.ranking import pseudonym
from app.services import exports
from app.services.auth_sessions import login
from tests.conftest import create_database, migrate
from tests.factories import (
    PASSWORD,
    auth,
    make_admin_headers,
    make_annotation,
    make_project,
    make_prompt,
    make_token,
    make_user,
)


def url(slug: str) -> str:
    return f"/api/v1/projects/{slug}/export"


@pytest.fixture
def h(session) -> dict[str, str]:
    return make_admin_headers(session)


@pytest.fixture
def data(session):
    project = make_project(session)
    prompts = [make_prompt(session, project, k=4) for _ in range(3)]
    users = [make_user(session) for _ in range(2)]
    for p in prompts:
        for u in users:
            make_annotation(session, p, u)
    return project, prompts, users


def lines(body: bytes) -> list[dict]:
    return [orjson.loads(x) for x in body.splitlines()]


def test_anonymous_401_annotator_403_admin_200(client, session, data):
    project = data[0]
    assert client.get(url(project.slug)).status_code == 401
    annotator = auth(make_token(session, make_user(session, role=Role.annotator)))
    assert client.get(url(project.slug), headers=annotator).status_code == 403
    r = client.get(url(project.slug), headers=make_admin_headers(session))
    assert r.status_code == 200


def test_auth_comes_before_parameter_checks(client, session, data):
    assert client.get(url(data[0].slug), params={"format": "csv"}).status_code == 401
    assert client.get(url("no-such-project")).status_code == 401
    annotator = auth(make_token(session, make_user(session, role=Role.annotator)))
    assert client.get(url("no-such-project"), headers=annotator).status_code == 403


def test_pairs_stream_as_ndjson(client, h, data, settings):
    project, prompts, users = data
    with client.stream("GET", url(project.slug), headers=h) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        assert r.headers["content-disposition"] == (
            f'attachment; filename="{project.slug}-pairs.jsonl"'
        )
        assert "content-length" not in r.headers  # streamed, not buffered
        body = b"".join(r.iter_bytes())
    rows = lines(body)
    assert len(rows) == 3 * 2 * 6  # prompts × annotators × C(4, 2)
    assert {r["annotator"] for r in rows} == {
        pseudonym(u.id, secret=settings.get_secret_key()) for u in users
    }
    assert rows[0]["prompt_id"] == prompts[0].external_id


@pytest.mark.parametrize("fmt", ["rankings", "consensus", "hh"])
def test_other_formats(client, h, data, fmt):
    project, _prompts, _ = data
    r = client.get(url(project.slug), params={"format": fmt}, headers=h)
    assert r.status_code == 200, r.text
    rows = lines(r.content)
    assert len(rows) == {"rankings": 6, "consensus": 3, "hh": 36}[fmt]


def test_parquet(client, h, data):
    project = data[0]
    r = client.get(url(project.slug), params={"file": "parquet"}, headers=h)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    assert r.headers["content-disposition"].endswith('-pairs.parquet"')
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == 36
    assert table.column_names[:3] == ["prompt", "chosen", "rejected"]


def test_unknown_project_404(client, h):
    r = client.get(url("no-such-project"), headers=h)
    assert r.status_code == 404
    assert "no-such-project" in r.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "csv"}, "format"),
        ({"file": "xlsx"}, "file"),
        ({"split": "dev"}, "split"),
        ({"test_fraction": "1.5"}, "test_fraction"),
        ({"test_fraction": "x"}, "test_fraction"),
        ({"seed": "-1"}, "seed"),
        ({"ties": "maybe"}, "ties"),
        ({"min_agreement": "2"}, "min_agreement"),
        ({"since": "yesterday"}, "since"),
        ({"prompt_format": "xml"}, "prompt_format"),
        ({"colour": "blue"}, "colour"),
        ({"format": "rankings", "ties": "keep"}, "ties"),
        ({"split": "test", "test_fraction": "0"}, "test_fraction"),
    ],
)
def test_bad_parameters_422_name_the_parameter(client, h, data, params, field):
    r = client.get(url(data[0].slug), params=params, headers=h)
    assert r.status_code == 422, r.text
    fields = [e["field"] for e in r.json()["errors"]]
    assert any(f == field or f.endswith("." + field) for f in fields), fields


def test_split_and_since_through_http(client, h, data):
    project = data[0]
    train = lines(client.get(url(project.slug), params={"split": "train"}, headers=h).content)
    test = lines(client.get(url(project.slug), params={"split": "test"}, headers=h).content)
    assert len(train) + len(test) == 36
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    later = client.get(
        url(project.slug), params={"since": "2999-01-01T00:00:00Z"}, headers=h
    ).content
    assert later == b""


def test_session_cookie_admin_may_export(client, session, data, settings):
    admin = make_user(session, role=Role.admin)
    _, secret = login(
        session, username=admin.username, password=PASSWORD, ip="127.0.0.1", settings=settings
    )
    client.cookies.set(WEB_SESSION_COOKIE, secret)
    assert client.get(url(data[0].slug)).status_code == 200


@pytest.fixture(params=["sqlite", "postgresql"])
def real_app(request, tmp_path):
    """An app with its own sessions (no test override) on a database of its own."""
    url, drop = create_database(request.param, tmp_path)
    app = None
    try:
        migrate(url)
        settings = Settings(data_dir=tmp_path / "data", database_url=url, secret_key="k")
        app = create_app(settings)
        yield app
    finally:
        if app is not None:
            app.state.engine.dispose()
        drop()


def test_the_request_session_stays_open_while_the_body_streams(real_app, monkeypatch):
    """FastAPI closes a request-scoped ``yield`` dependency (the session) only after the
    response is sent: a body streamed in many chunks after the endpoint returned still reads
    through it, in one snapshot."""
    monkeypatch.setattr(exports, "CHUNK_BYTES", 1)
    monkeypatch.setattr(exports, "BATCH_ANNOTATIONS", 2)
    with real_app.state.session_factory() as s:
        project = make_project(s)
        user = make_user(s)
        for _ in range(7):
            make_annotation(s, make_prompt(s, project, k=2), user)
        headers = make_admin_headers(s)
        slug = project.slug
    with TestClient(real_app) as client, client.stream("GET", url(slug), headers=headers) as r:
        assert r.status_code == 200
        chunks = list(r.iter_bytes())
    body = b"".join(chunks)
    assert len(body.splitlines()) == 7
    assert len(chunks) >= 2
