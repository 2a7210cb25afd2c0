"""Database faults under a real ``prefero serve``: the PostgreSQL server stopped for a few
seconds under load and started again (a private cluster, so the shared server is never
touched), and a statement held up by a lock until the statement timeout cancels it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import psycopg
import pytest

from app.models import Role
from bench._support import libpq
from tests.conftest import create_database, migrate
from tests.system._harness import (
    CSRF_FIELD,
    REQUEST_TIMEOUT_S,
    Annotator,
    Call,
    Ledger,
    PrivateCluster,
    Server,
    add_accounts,
    add_web_session,
    check_labels,
    join_all,
    seed_project,
    send,
    server_error_samples,
    timed,
)

pytestmark = pytest.mark.slow

ANNOTATORS = 20
LOAD_S = 3.0
DOWN_S = 4.0
FAST_S = 3.0
"""The longest a request may take while the database is down."""
RECOVERY_S = 1.5
"""After the database is back, every request started later than this must succeed."""


@pytest.fixture(scope="module")
def cluster():
    c = PrivateCluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


def _probe_clients(base_url: str, *, annotator_cookie: str, admin_cookie: str, admin_token: str):
    """(kind, client, method, path, data) for every kind of request besides the labeling API:
    HTML pages (session cookie lookup), an admin page, an admin API call (token lookup), the
    login form (password check), and the two probes."""
    timeout = REQUEST_TIMEOUT_S
    anon = httpx.Client(base_url=base_url, timeout=timeout)
    form = anon.get("/login")
    assert form.status_code == 200
    csrf = CSRF_FIELD.search(form.text)
    assert csrf is not None
    login = {"username": "ann-001", "password": "wrong password", "csrf_token": csrf.group(1)}
    annotator = httpx.Client(
        base_url=base_url, timeout=timeout, cookies={"prefero_session": annotator_cookie}
    )
    admin = httpx.Client(
        base_url=base_url, timeout=timeout, cookies={"prefero_session": admin_cookie}
    )
    api = httpx.Client(
        base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {admin_token}"}
    )
    return [
        ("page /label", annotator, "GET", "/label", None),
        ("page /label/faults", annotator, "GET", "/label/faults", None),
        ("page /admin", admin, "GET", "/admin", None),
        ("api /projects", api, "GET", "/api/v1/projects", None),
        ("login", anon, "POST", "/login", login),
        ("readyz", anon, "GET", "/readyz", None),
        ("healthz", anon, "GET", "/healthz", None),
    ], [anon, annotator, admin, api]


UP_STATUS = {
    "page /label": {200},
    "page /label/faults": {200},
    "page /admin": {200},
    "api /projects": {200},
    "login": {401},
    "readyz": {200},
    "healthz": {200},
    "next": {200, 204},
    "submit": {201},
}


def _is_clean_503(c: Call) -> bool:
    """503 with Retry-After and the JSON error body, nothing else."""
    if c.status != 503 or not c.retry_after or not c.content_type.startswith("application/json"):
        return False
    body = orjson.loads(c.body)
    return isinstance(body, dict) and isinstance(body.get("detail"), str)


def test_postgres_stopped_and_started_under_load(cluster, tmp_path):
    url = cluster.create_database("prefero_faults")
    migrate(url)
    seeded = seed_project(
        url, prompts=1000, k=4, overlap=3, lease_seconds=600, annotators=ANNOTATORS, slug="faults"
    )
    admin = add_accounts(url, n=1, prefix="admin", role=Role.admin)[0]
    annotator_cookie = add_web_session(url, user_id=seeded.accounts[0].user_id)
    admin_cookie = add_web_session(url, user_id=admin.user_id)
    server = Server(
        database_url=url,
        data_dir=tmp_path / "data",
        workers=2,
        login_max_failures="1000000",
    )
    ledger, probes = Ledger(), Ledger()
    stop = threading.Event()
    clients = []
    try:
        server.start()
        workers = server.worker_pids()
        assert len(workers) >= 2
        plan, clients = _probe_clients(
            server.base_url,
            annotator_cookie=annotator_cookie,
            admin_cookie=admin_cookie,
            admin_token=admin.token,
        )

        def probe() -> None:
            while not stop.is_set():
                for kind, client, method, path, data in plan:
                    timed(client, probes, kind, method, path, data=data)
                stop.wait(0.1)

        threads = [
            Annotator(
                server.base_url,
                seeded.slug,
                acc,
                ledger,
                stop,
                idle_poll=0.5,
                give_up_on_no_answer=False,
                seed=i,
            )
            for i, acc in enumerate(seeded.accounts)
        ]
        prober = threading.Thread(target=probe, daemon=True)
        for t in [*threads, prober]:
            t.start()
        time.sleep(LOAD_S)
        acked_before = len(ledger.acked)

        stopping_at = time.monotonic()
        cluster.stop()
        down_at = time.monotonic()
        time.sleep(DOWN_S)
        starting_at = time.monotonic()
        cluster.start()
        up_at = time.monotonic()
        time.sleep(LOAD_S + RECOVERY_S)
        acked_after = len(ledger.acked)
        stop.set()
        join_all(threads)
        prober.join(30)
        assert server.alive(), server.log()
        assert server.worker_pids() == workers, "a worker was restarted"
    finally:
        stop.set()
        for c in clients:
            c.close()
        server.stop()

    calls = ledger.calls + probes.calls
    assert server_error_samples(ledger) == []
    assert server_error_samples(probes) == []
    assert [c for c in calls if c.status is None] == []  # the service itself stayed up

    # While the database was down: fast, clean 503s (the liveness probe still says ok).
    outage = [c for c in calls if c.started >= down_at and c.ended <= starting_at]
    assert len(outage) > 50
    for c in outage:
        assert c.seconds < FAST_S, (c.kind, c.seconds)
        if c.kind == "healthz":
            assert c.status == 200
        else:
            assert _is_clean_503(c), (c.kind, c.status, c.retry_after, c.body[:300])
    seen_down = {c.kind for c in outage}
    assert seen_down >= set(UP_STATUS), seen_down

    # Every answer, whatever the moment: the expected one, or a clean 503.
    for c in calls:
        assert c.status in UP_STATUS[c.kind] or _is_clean_503(c), (c.kind, c.status, c.body)

    # Back up: the pool reconnects by itself (a closed connection is dropped at checkout); no
    # restart of the service.
    late = [c for c in calls if c.started >= up_at + RECOVERY_S]
    assert len(late) > 20
    failed_late = [(c.kind, c.status, c.body[:200]) for c in late if c.status == 503]
    assert failed_late == []
    assert acked_after > acked_before

    check = check_labels(url, project_id=seeded.project_id, ledger=ledger, all_acked=True)
    assert check.problems == []
    assert check.annotations == len(ledger.acked)
    first_ok = min(
        (c.ended for c in ledger.calls if c.started >= starting_at and c.status in (200, 201)),
        default=float("nan"),
    )
    n503 = sum(1 for c in calls if c.status == 503)
    last_503 = max((c.started - up_at for c in calls if c.status == 503), default=float("nan"))
    slowest = max(c.seconds for c in outage)
    print(
        f"\nPostgreSQL stopped {down_at - stopping_at:.1f} s + down {DOWN_S:g} s + started "
        f"{up_at - starting_at:.1f} s under {ANNOTATORS} annotators: {len(outage)} requests "
        f"while down, all 503 + Retry-After (slowest {slowest * 1000:.0f} ms), {n503} 503s in "
        f"all, 0 other errors; first success {first_ok - up_at:+.2f} s and last 503 (started) "
        f"{last_503:+.2f} s after the server was up; "
        f"{len(late)} requests after recovery all succeeded; {len(ledger.acked)} submissions "
        f"acknowledged = {check.annotations} stored, 0 lost, 0 duplicated; statuses "
        f"{dict(ledger.statuses('next'))} next, {dict(ledger.statuses('submit'))} submit"
    )


def test_statement_timeout_frees_the_worker(tmp_path):
    url, drop = create_database("postgresql", tmp_path)
    try:
        migrate(url)
        _statement_timeout(url, tmp_path)
    finally:
        drop()


TIMEOUT_MS = 1000
BLOCKED = 6
"""Submits stuck behind the lock at once: more than the worker has threads (4)."""


def _statement_timeout(url: str, tmp_path) -> None:
    seeded = seed_project(
        url, prompts=50, k=2, overlap=1, lease_seconds=600, annotators=BLOCKED + 1, slug="slow"
    )
    server = Server(
        database_url=url,
        data_dir=tmp_path / "data",
        workers=1,
        db_statement_timeout_ms=str(TIMEOUT_MS),
        db_pool_size="2",
    )
    ledger = Ledger()
    clients = [
        httpx.Client(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {acc.token}"},
            timeout=REQUEST_TIMEOUT_S,
        )
        for acc in seeded.accounts
    ]

    def submit(i: int, lease: dict) -> Call:
        ranking = [[c["id"]] for c in lease["completions"]]
        path = f"/api/v1/leases/{lease['lease_id']}/submit"
        r, call = send(clients[i], "submit", "POST", path, json={"ranking": ranking})
        ledger.record(call)
        if r is not None and r.status_code == 201:
            ledger.ack(r)
        return call

    try:
        server.start()
        tasks = [
            clients[i].get(f"/api/v1/projects/{seeded.slug}/tasks/next").json()
            for i in range(BLOCKED)
        ]
        lease_ids = [t["lease_id"] for t in tasks]
        # A long transaction elsewhere (a maintenance script, a migration) holds those rows.
        with psycopg.connect(libpq(url)) as locker:
            locker.execute("SELECT id FROM lease WHERE id = ANY(%s) FOR UPDATE", [lease_ids])
            started = time.monotonic()
            with ThreadPoolExecutor(BLOCKED) as pool:
                blocked = list(pool.map(submit, range(BLOCKED), tasks))
            all_done = time.monotonic() - started
            for c in blocked:
                assert _is_clean_503(c), (c.status, c.body)
                assert c.seconds >= TIMEOUT_MS / 1000 * 0.9  # it did wait for the lock
            assert all_done < 2 * TIMEOUT_MS / 1000 + 3

            # The lock is still held, and the worker serves the next annotator at once.
            free = clients[BLOCKED]
            t0 = time.monotonic()
            task = free.get(f"/api/v1/projects/{seeded.slug}/tasks/next")
            assert task.status_code == 200
            done = free.post(
                f"/api/v1/leases/{task.json()['lease_id']}/submit",
                json={"ranking": [[c["id"]] for c in task.json()["completions"]]},
            )
            assert done.status_code == 201
            ledger.ack(done)
            served_in = time.monotonic() - t0
            with psycopg.connect(libpq(url)) as watcher:
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()[0]
            assert waiting == 0  # the cancelled statements are gone, not left waiting
            locker.rollback()

        retried = [submit(i, tasks[i]) for i in range(BLOCKED)]
        assert [c.status for c in retried] == [201] * BLOCKED
    finally:
        for c in clients:
            c.close()
        server.stop()
    check = check_labels(url, project_id=seeded.project_id, ledger=ledger, all_acked=True)
    assert check.problems == []
    assert check.annotations == BLOCKED + 1
    assert "database unavailable" in server.log()
    fastest, slowest = min(c.seconds for c in blocked), max(c.seconds for c in blocked)
    print(
        f"\nstatement timeout {TIMEOUT_MS} ms: {BLOCKED} submits blocked by a row lock all "
        f"answered 503 + Retry-After within {all_done:.2f} s (each {fastest:.2f}"
        f"–{slowest:.2f} s); with the lock still held another annotator got next + submit in "
        f"{served_in * 1000:.0f} ms; after the lock was released the {BLOCKED} retries got 201"
    )
