"""Export benchmark: stream a large ``pairs`` export over HTTP from a real server.

Run from the repository root with the project's virtual environment active::

    python bench/export_bench.py                    # 250,000 annotations, K = 4: 1.5 M pairs
    python bench/export_bench.py --repeat 3 --json export.json
    python bench/export_bench.py --annotations 20000 --no-goals   # a quick look

It creates a fresh PostgreSQL database (``CREATE DATABASE prefero_bench_export_<random>`` on
``--pg-url``, dropped afterwards), migrates it with ``prefero db upgrade`` and seeds it with
psycopg ``COPY``: one project (K = 4, overlap 2, Likert on), ``--annotations / 2`` prompts with
4 completions each (prompts 60–240 characters, completions 240–360), 200 annotators and one
admin with an API token, and ``--annotations`` submitted annotations — each a strict ranking
of the 4 completions (6 pairs) with Likert scores and a display order. Then ``ANALYZE``.

It starts ``prefero serve --workers 1`` on a free loopback port, makes one small warm-up
export (``since`` near the end: a few rows), and then, ``--repeat`` times, streams
``GET /api/v1/projects/{slug}/export?format=pairs`` to a temporary file with a plain
``http.client`` reader, counting lines. Per run: pairs/s (lines / wall time from sending the
request to the last byte), time to first byte, MB/s. Meanwhile a thread samples the server
process's RSS every 20 ms: the RSS growth is the peak over all runs minus the RSS just before
the first one. Then it times ``GET /api/v1/projects/{slug}/stats`` (the quality statistics)
on the same data, ``--repeat`` times.

Goals (exit status 1 when one is missed, unless ``--no-goals``): median ≥ 100,000 pairs/s,
median time to first byte < 1 s, RSS growth < 100 MB, exactly 6 × annotations lines, and a
median stats time < 2 s.

The client, the server and PostgreSQL share the machine: the load average before and after
is printed, and figures on a busy machine are indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psutil
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _support import free_port, libpq, prefero_command  # noqa: E402

from app.security import hash_token, new_token  # noqa: E402

SLUG = "bench-export"
K = 4
OVERLAP = 2
ANNOTATORS = 200
GOAL_PAIRS_S = 100_000
GOAL_TTFB_S = 1.0
GOAL_RSS_MB = 100.0
GOAL_STATS_S = 2.0


# --------------------------------------------------------------------------- database


class Database:
    def __init__(self, pg_url: str) -> None:
        server = make_url(pg_url)
        if not server.drivername.startswith("postgresql"):
            raise SystemExit("--pg-url must be a postgresql+psycopg:// URL")
        self.name = f"prefero_bench_export_{secrets.token_hex(4)}"
        self._admin = libpq(pg_url)
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        self.libpq = libpq(self.url)

    def drop(self) -> None:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _corpus(rng: random.Random, chars: int) -> str:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    vocab = sorted(
        {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    )
    vocab += ["the", "a", "of", "to", "and", "in", "is", "it", "for", "résumé", "café", "東京"]
    punct = [" "] * 12 + [", ", ". ", "? ", ".\n", ' "', '" ']
    out, total = [], 0
    while total < chars:
        words = rng.choices(vocab, k=64)
        chunk = "".join(w + s for w, s in zip(words, rng.choices(punct, k=64), strict=True))
        out.append(chunk)
        total += len(chunk)
    return "".join(out)


def seed(db: Database, *, annotations: int, rng_seed: int) -> tuple[str, datetime]:
    """Seed with COPY; returns the admin's token secret and the newest annotation time."""
    rng = random.Random(rng_seed)
    corpus = _corpus(rng, 3_000_000)
    limit = len(corpus) - 1000

    def snippet(lo: int, hi: int) -> str:
        start = rng.randrange(limit)
        return corpus[start : start + rng.randint(lo, hi)].strip() or "x"

    prompts = (annotations + OVERLAP - 1) // OVERLAP
    token = new_token()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(db.libpq) as conn:
        project_id = conn.execute(
            "INSERT INTO project (name, slug, guidelines, completions_per_task, overlap,"
            " allow_ties, likert, flags, require_rationale, lease_seconds, system_prompt,"
            " instruction_template, members_only, created_at)"
            " VALUES ('Export benchmark', %s, '', %s, %s, true, true, '[]', false, 600, '', '',"
            " false, %s) RETURNING id",
            (SLUG, K, OVERLAP, t0),
        ).fetchone()[0]
        with conn.cursor().copy(
            'COPY "user" (username, role, active, created_at) FROM STDIN'
        ) as cp:
            cp.write_row(("bench-admin", "admin", True, t0))
            for i in range(ANNOTATORS):
                cp.write_row((f"annotator-{i:03d}", "annotator", True, t0))
        users = [r[0] for r in conn.execute('SELECT id FROM "user" ORDER BY id').fetchall()]
        admin, annotators = users[0], users[1:]
        conn.execute(
            "INSERT INTO api_token (user_id, name, token_hash, created_at) VALUES (%s, %s, %s, %s)",
            (admin, "bench", hash_token(token), t0),
        )
        with conn.cursor().copy(
            "COPY prompt (project_id, external_id, messages, metadata, created_at,"
            " annotation_count) FROM STDIN"
        ) as cp:
            for i in range(prompts):
                messages = [{"role": "user", "content": snippet(60, 240) + "?"}]
                n = min(OVERLAP, annotations - i * OVERLAP)
                cp.write_row(
                    (project_id, f"p{i:07d}", orjson.dumps(messages).decode(), "{}", t0, n)
                )
        prompt_ids = [r[0] for r in conn.execute("SELECT id FROM prompt ORDER BY id").fetchall()]
        with conn.cursor().copy(
            "COPY completion (prompt_id, external_id, text, model, params, created_at) FROM STDIN"
        ) as cp:
            for pid in prompt_ids:
                for j in range(K):
                    cp.write_row((pid, f"c{j}", snippet(240, 360), f"model-{j % 2}", "{}", t0))
        first, last, count = conn.execute(
            "SELECT min(id), max(id), count(*) FROM completion"
        ).fetchone()
        assert last - first + 1 == count == len(prompt_ids) * K, "completion ids not contiguous"
        newest = t0
        with conn.cursor().copy(
            "COPY annotation (project_id, prompt_id, user_id, revision, status, ranking, likert,"
            " flags, rationale, display_order, duration_ms, both_bad, created_at) FROM STDIN"
        ) as cp:
            n = 0
            for i, pid in enumerate(prompt_ids):
                cids = [first + i * K + j for j in range(K)]
                for uid in rng.sample(annotators, OVERLAP):
                    if n == annotations:
                        break
                    order = rng.sample(cids, K)
                    shown = rng.sample(cids, K)
                    scores = sorted((rng.randint(1, 7) for _ in range(K)), reverse=True)
                    likert = {str(c): s for c, s in zip(order, scores, strict=True)}
                    newest = t0 + timedelta(seconds=n)
                    cp.write_row(
                        (
                            project_id,
                            pid,
                            uid,
                            1,
                            "submitted",
                            orjson.dumps([[c] for c in order]).decode(),
                            orjson.dumps(likert).decode(),
                            "{}",
                            "",
                            orjson.dumps(shown).decode(),
                            rng.randint(5_000, 120_000),
                            False,
                            newest,
                        )
                    )
                    n += 1
        conn.commit()
    with psycopg.connect(db.libpq, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return token, newest


# --------------------------------------------------------------------------- server


class Server:
    def __init__(self, db_url: str, data_dir: Path) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            PREFERO_DATABASE_URL=db_url,
            PREFERO_DATA_DIR=str(data_dir),
            PREFERO_SECRET_KEY="bench-export-secret-key",
        )
        upgrade = [prefero_command(), "db", "upgrade"]
        subprocess.run(upgrade, env=env, check=True, capture_output=True)
        self.log = open(data_dir / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                prefero_command(),
                "serve",
                "--workers",
                "1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefero serve exited with status {self.proc.returncode}")
            try:
                status, _, _ = self.get("/readyz", None)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("/readyz did not answer 200 in time")

    def rss(self) -> int:
        procs = [self.ps, *self.ps.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def get(self, path: str, token: str | None) -> tuple[int, bytes, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            t = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, body, time.perf_counter() - t
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


class RssSampler(threading.Thread):
    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = server.rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


@dataclass
class Run:
    pairs: int
    bytes: int
    seconds: float
    ttfb_s: float
    server_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    pairs_per_s: float = field(init=False)
    mb_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.pairs_per_s = self.pairs / self.seconds
        self.mb_per_s = self.bytes / self.seconds / 1e6

    @property
    def cpu_bound_pairs_per_s(self) -> float:
        """What the CPU time allows on this machine's cores with nothing else running: the
        pipeline's busiest process, or all three sharing the cores, whichever is slower."""
        cores = os.cpu_count() or 1
        total = self.server_cpu_s + self.postgres_cpu_s + self.client_cpu_s
        busiest = max(self.server_cpu_s, self.postgres_cpu_s, self.client_cpu_s)
        return self.pairs / max(busiest, total / cores)


class CpuClock:
    """CPU seconds of the server's processes and of the bench database's PostgreSQL backends
    (found by the database name in their process titles)."""

    def __init__(self, server: Server, db_name: str) -> None:
        self.server, self.db_name = server, db_name

    def _backends(self) -> dict[int, float]:
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if cmd.startswith("postgres:") and self.db_name in cmd:
                try:
                    t = p.cpu_times()
                    out[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
        return out

    def _server(self) -> float:
        total = 0.0
        for p in [self.server.ps, *self.server.ps.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def snapshot(self) -> tuple[float, dict[int, float], float]:
        return self._server(), self._backends(), time.process_time()

    def since(self, start: tuple[float, dict[int, float], float]) -> tuple[float, float, float]:
        server, backends, client = self.snapshot()
        pg = sum(t - start[1].get(pid, 0.0) for pid, t in backends.items())
        return server - start[0], pg, client - start[2]


def stream_export(server: Server, token: str, out: Path) -> Run:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    lines = size = 0
    ttfb = None
    try:
        t = time.perf_counter()
        conn.request(
            "GET",
            f"/api/v1/projects/{SLUG}/export?format=pairs",
            headers={"Authorization": f"Bearer {token}"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"export answered {resp.status}: {resp.read()[:500]!r}")
        with out.open("wb") as f:
            while chunk := resp.read1(1 << 20):
                if ttfb is None:
                    ttfb = time.perf_counter() - t
                f.write(chunk)
                lines += chunk.count(b"\n")
                size += len(chunk)
        elapsed = time.perf_counter() - t
    finally:
        conn.close()
    return Run(lines, size, elapsed, ttfb if ttfb is not None else elapsed)


# --------------------------------------------------------------------------- report


def _versions(db: Database) -> dict[str, str]:
    import fastapi
    import sqlalchemy
    import starlette
    import uvicorn

    with psycopg.connect(db.libpq) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "python": platform.python_version(),
        "postgresql": pg,
        "fastapi": fastapi.__version__,
        "starlette": starlette.__version__,
        "uvicorn": uvicorn.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "orjson": orjson.__version__,
    }


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--pg-url",
        default=os.environ.get(
            "PREFERO_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument("--annotations", type=int, default=250_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="Also write the figures to this file.")
    ap.add_argument("--no-goals", action="store_true", help="Exit 0 even when a goal is missed.")
    args = ap.parse_args()

    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"machine: {_machine()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    db = Database(args.pg_url)
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="prefero-export-bench-"))
    try:
        print(f"versions: {json.dumps(_versions(db))}")
        t = time.perf_counter()
        server_dir = tmp / "data"
        server_dir.mkdir()
        # Migrate first (the server's `db upgrade`), then seed.
        server = Server(db.url, server_dir)
        token, newest = seed(db, annotations=args.annotations, rng_seed=args.seed)
        print(f"seeded {args.annotations:,} annotations (K={K}) in {time.perf_counter() - t:.1f} s")
        since = (newest - timedelta(seconds=10)).isoformat().replace("+00:00", "Z")
        status, body, _ = server.get(
            f"/api/v1/projects/{SLUG}/export?format=pairs&since={since}", token
        )
        if status != 200:
            raise RuntimeError(f"warm-up export answered {status}: {body[:300]!r}")
        baseline = server.rss()
        sampler = RssSampler(server)
        sampler.start()
        runs = []
        clock = CpuClock(server, db.name)
        for i in range(args.repeat):
            start = clock.snapshot()
            run = stream_export(server, token, tmp / "pairs.jsonl")
            run.server_cpu_s, run.postgres_cpu_s, run.client_cpu_s = clock.since(start)
            runs.append(run)
            print(
                f"run {i + 1}: {run.pairs:,} pairs in {run.seconds:.2f} s = "
                f"{run.pairs_per_s:,.0f} pairs/s, {run.mb_per_s:.0f} MB/s, "
                f"first byte {run.ttfb_s * 1000:.0f} ms; CPU s: server {run.server_cpu_s:.1f}, "
                f"PostgreSQL {run.postgres_cpu_s:.1f}, client {run.client_cpu_s:.1f} "
                f"(CPU-bound: {run.cpu_bound_pairs_per_s:,.0f} pairs/s)"
            )
            (tmp / "pairs.jsonl").unlink()
        peak = sampler.stop()
        growth_mb = (peak - baseline) / 1e6
        stats_times: list[float] = []
        for _ in range(args.repeat):  # the quality statistics of the same data
            status, body, stats_s = server.get(f"/api/v1/projects/{SLUG}/stats", token)
            if status != 200:
                raise RuntimeError(f"stats answered {status}: {body[:300]!r}")
            stats_times.append(stats_s)
        stats_median = statistics.median(stats_times)
        stats = (
            f"median {stats_median * 1000:.0f} ms ("
            + ", ".join(f"{t * 1000:.0f}" for t in stats_times)
            + " ms)"
        )
    finally:
        if server is not None:
            server.stop()
        db.drop()
        shutil.rmtree(tmp, ignore_errors=True)

    med_rate = statistics.median(r.pairs_per_s for r in runs)
    med_ttfb = statistics.median(r.ttfb_s for r in runs)
    expected = args.annotations * 6
    med_cpu = statistics.median(r.cpu_bound_pairs_per_s for r in runs)
    med_server = statistics.median(r.pairs / r.server_cpu_s for r in runs if r.server_cpu_s)
    print(f"median: {med_rate:,.0f} pairs/s, first byte {med_ttfb * 1000:.0f} ms")
    print(
        f"median CPU cost: {med_server:,.0f} pairs per server CPU-second; CPU-bound estimate "
        f"{med_cpu:,.0f} pairs/s on {os.cpu_count()} cores with nothing else running"
    )
    print(f"server RSS: {baseline / 1e6:.0f} MB before, peak growth {growth_mb:.1f} MB")
    print(f"GET /api/v1/projects/{SLUG}/stats: {stats}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    goals = {
        f"pairs/s >= {GOAL_PAIRS_S:,}": med_rate >= GOAL_PAIRS_S,
        f"first byte < {GOAL_TTFB_S:.0f} s": med_ttfb < GOAL_TTFB_S,
        f"RSS growth < {GOAL_RSS_MB:.0f} MB": growth_mb < GOAL_RSS_MB,
        f"{expected:,} pairs every run": all(r.pairs == expected for r in runs),
        f"stats < {GOAL_STATS_S:.0f} s": stats_median < GOAL_STATS_S,
    }
    for name, ok in goals.items():
        print(f"goal {name}: {'ok' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "annotations": args.annotations,
                    "runs": [asdict(r) for r in runs],
                    "median_pairs_per_s": med_rate,
                    "median_ttfb_s": med_ttfb,
                    "median_pairs_per_server_cpu_s": med_server,
                    "median_cpu_bound_pairs_per_s": med_cpu,
                    "rss_growth_mb": growth_mb,
                    "stats_s": stats_times,
                    "median_stats_s": stats_median,
                    "goals": goals,
                },
                indent=2,
            )
        )
    return 0 if args.no_goals or all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
