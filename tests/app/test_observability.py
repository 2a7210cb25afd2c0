"""Request ids, structured logs and ``GET /metrics``.

- every response carries ``X-Request-ID`` (a sane incoming one is kept, anything else is
  replaced); every log record emitted while a request is handled carries it, also from the
  thread pool; one access line per request, without the query string;
- the JSON formatter writes one object per line; ``log_config`` is a valid dictConfig;
- ``/metrics`` (admin only) answers in Prometheus text format with the request counters by
  route template, the latency histogram, in-flight requests and the database gauges;
- in multiprocess mode the counters of several processes add up.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.models import GenerationJob, JobStatus, Lease, LeaseStatus, Role, utcnow
from app.observability import JsonFormatter, log_config, request_id_from, resolve_log_format
from tests.factories import auth, make_project, make_prompt, make_token, make_user


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------- request ids


def test_every_response_has_a_request_id(client):
    a = client.get("/healthz").headers["x-request-id"]
    b = client.get("/nowhere").headers["x-request-id"]
    assert a != b
    assert len(a) == 32


def test_a_sane_incoming_request_id_is_kept_and_others_replaced(client):
    assert (
        client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.91"}).headers["x-request-id"]
        == "lb-7f3a.91"
    )
    for bad in ("has space", "x" * 129, "<script>", "ä".encode(), "-starts-with-dash"):
        got = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert got != bad
        assert len(got) == 32


def test_request_id_rules():
    assert request_id_from("abc") == "abc"
    assert request_id_from(None) != request_id_from(None)
    assert request_id_from("a\nb") != "a\nb"


# --------------------------------------------------------------------------- logs


def test_access_line_per_request_without_query_string(client, session, caplog):
    user = make_user(session, role=Role.admin)
    headers = auth(make_token(session, user))
    caplog.set_level(logging.INFO, logger="prefero.access")
    r = client.get(
        "/api/v1/projects?token=SECRET-IN-QUERY", headers={**headers, "X-Request-ID": "req-1"}
    )
    assert r.status_code == 200
    lines = [rec for rec in caplog.records if rec.name == "prefero.access"]
    assert len(lines) == 1
    rec = lines[0]
    assert rec.method == "GET"
    assert rec.path == "/api/v1/projects"
    assert rec.status == 200
    assert rec.user_id == user.id
    assert rec.request_id == "req-1"
    assert rec.duration_ms >= 0
    formatted = JsonFormatter().format(rec)
    assert "SECRET-IN-QUERY" not in formatted
    assert "SECRET-IN-QUERY" not in caplog.text
    assert json.loads(formatted)["request_id"] == "req-1"


def test_records_from_request_threads_carry_the_request_id(app, client, caplog):
    def noisy() -> dict:
        logging.getLogger("prefero.test").warning("inside the handler")
        return {}

    app.add_api_route("/_test/noisy", noisy)  # a sync endpoint: runs in the thread pool
    caplog.set_level(logging.INFO)
    with caplog.at_level(logging.INFO):
        client.get("/_test/noisy", headers={"X-Request-ID": "thread-1"})
    handler_lines = [r for r in caplog.records if r.name == "prefero.test"]
    assert handler_lines
    assert json.loads(JsonFormatter().format(handler_lines[0]))["request_id"] == "thread-1"


def test_json_formatter_and_log_config():
    record = logging.LogRecord("prefero", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "boom x"
    assert out["level"] == "error"
    assert out["request_id"] is None
    assert out["ts"].endswith("+00:00")
    cfg = log_config("json", "info")
    assert cfg["handlers"]["default"]["formatter"] == "json"
    assert log_config("text")["handlers"]["default"]["formatter"] == "text"
    logging.config.dictConfig({**cfg, "disable_existing_loggers": False})  # valid
    logging.getLogger("uvicorn").handlers.clear()
    logging.getLogger("prefero").handlers.clear()
    logging.getLogger("prefero").propagate = True
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.root.handlers.clear()


def test_auto_log_format_is_json_unless_a_terminal():
    class Tty:
        def isatty(self) -> bool:
            return True

    assert resolve_log_format("auto", Tty()) == "text"
    assert resolve_log_format("auto", object()) == "json"
    assert resolve_log_format("text", object()) == "text"


# --------------------------------------------------------------------------- /metrics


def test_metrics_needs_an_admin(client, session):
    assert client.get("/metrics").status_code == 401
    annotator = make_token(session, make_user(session))
    assert client.get("/metrics", headers=auth(annotator)).status_code == 403


def test_metrics_counts_requests_by_route_template(client, session):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    project = make_project(session)
    prompt = make_prompt(session, project)
    before = samples(client.get("/metrics", headers=admin).text)
    for _ in range(3):
        assert client.get(f"/api/v1/prompts/{prompt.id}", headers=admin).status_code == 200
    client.get("/api/v1/prompts/999999999", headers=admin)
    r = client.get("/metrics", headers=admin)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)
    route = "/api/v1/prompts/{prompt_id}"
    key = ("prefero_http_requests_total", (("method", "GET"), ("route", route), ("status", "200")))
    assert after[key] - before.get(key, 0) == 3
    miss = ("prefero_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))
    assert after[miss] - before.get(miss, 0) == 1
    count = ("prefero_http_request_duration_seconds_count", (("route", route),))
    assert after[count] - before.get(count, 0) == 4
    assert after[("prefero_http_requests_in_flight", ())] >= 1  # the scrape itself
    routes = {dict(labels).get("route") for _, labels in after}
    assert f"/api/v1/prompts/{prompt.id}" not in routes


def test_metrics_reads_queue_leases_and_jobs_from_the_database(client, session):
    admin_user = make_user(session, role=Role.admin)
    admin = auth(make_token(session, admin_user))
    project = make_project(session, overlap=2)
    prompts = [make_prompt(session, project, k=2) for _ in range(3)]
    now = utcnow()
    session.add_all(
        [
            Lease(
                project_id=project.id,
                prompt_id=prompts[0].id,
                user_id=admin_user.id,
                status=LeaseStatus.open,
                display_order=[],
                expires_at=now + timedelta(minutes=5),
            ),
            Lease(
                project_id=project.id,
                prompt_id=prompts[1].id,
                user_id=admin_user.id,
                status=LeaseStatus.open,
                display_order=[],
                expires_at=now - timedelta(minutes=5),  # expired: not live
            ),
        ]
    )
    session.add(
        GenerationJob(
            project_id=project.id, backend="openai", models=["m"], k=2, status=JobStatus.failed
        )
    )
    session.commit()
    got = samples(client.get("/metrics", headers=admin).text)
    slug = (("project", project.slug),)
    assert got[("prefero_queue_prompts", slug)] == 3
    assert got[("prefero_leases_live", slug)] == 1
    assert got[("prefero_generation_jobs", (("status", "failed"),))] >= 1
    assert ("prefero_generation_jobs", (("status", "queued"),)) in got


_WORKER = """
import sys
from app.observability import REQUESTS, IN_FLIGHT
for _ in range(int(sys.argv[1])):
    REQUESTS.labels("GET", "/x", "200").inc()
IN_FLIGHT.inc()
"""
_SCRAPE = """
from app.observability import exposition
class G:
    queue_prompts = {}
    live_leases = {}
    jobs = {}
print(exposition(G())[0].decode())
"""


def test_multiprocess_counters_add_up(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in ("2", "3"):
        subprocess.run([sys.executable, "-c", _WORKER, n], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", _SCRAPE], env=env, check=True, capture_output=True, text=True
    ).stdout
    got = samples(out)
    key = ("prefero_http_requests_total", (("method", "GET"), ("route", "/x"), ("status", "200")))
    assert got[key] == 5


@pytest.mark.parametrize("path", ["/static/css/app.css", "/no/such/page"])
def test_unrouted_paths_do_not_create_a_series_per_url(client, session, path):
    admin = auth(make_token(session, make_user(session, role=Role.admin)))
    client.get(path)
    routes = {
        dict(labels).get("route")
        for _, labels in samples(client.get("/metrics", headers=admin).text)
    }
    assert path not in routes
