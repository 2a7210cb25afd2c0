"""/healthz and /readyz."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_readyz_when_migrated(client, backend):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"] == backend
    assert body["migration"]


def test_readyz_not_ready_without_migrations(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, secret_key="x"))
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert "prefero db upgrade" in r.json()["detail"]


def test_readyz_not_ready_when_database_unreachable(tmp_path):
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    app = create_app(Settings(data_dir=tmp_path, database_url=url, secret_key="x"))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert c.get("/healthz").status_code == 200
    assert r.status_code == 503
    assert r.json()["detail"].startswith("database unreachable")


def test_database_outage_is_503_with_retry_after(tmp_path):
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    app = create_app(Settings(data_dir=tmp_path, database_url=url, secret_key="x"))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/v1/projects", headers={"Authorization": "Bearer pf_x"})
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert "Traceback" not in r.text


def test_root_leads_to_the_labeling_pages(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307
    assert r.headers["location"] == "/label"
    r = client.get("/label", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/label"


def test_api_docs_are_served_without_a_cdn(client):
    r = client.get("/docs")
    assert r.status_code == 200
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in r.text
    assert "cdn" not in r.text.lower()
    assert client.get("/openapi.json").json()["info"]["title"] == "prefero"
