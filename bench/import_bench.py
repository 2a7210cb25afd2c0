"""End-to-end import benchmark: POST a large JSONL file to a real `prefero serve` process.

Run from the repository root with the project's virtual environment active::

    python bench/import_bench.py                      # 100,000 prompts x 4 completions
    python bench/import_bench.py --backends postgresql --repeat 3

For each backend and repetition it creates a fresh database (a SQLite file in a temporary data
directory, or ``CREATE DATABASE prefero_bench_<random>`` on the PostgreSQL server given by
``--pg-url``, dropped afterwards), migrates it with ``prefero db upgrade``, creates an admin, a
token and a project through the CLI, starts ``prefero serve`` (one worker) on a free loopback
port and streams the file from disk as ``application/x-ndjson``. While the upload runs it samples
the server's resident memory (process and children) every 50 ms. Afterwards it checks the
response counts and the row counts in the database.

As an in-run baseline it also times parsing the same file line by line with ``orjson.loads``
alone (no validation, no database), so the import can be stated as a multiple of that.

Goals (checked on PostgreSQL, the production backend; exit status 1 when one fails):
upload time <= 20 s (median of the repetitions) and RSS growth <= 300 MB (worst repetition).
MB means 10**6 bytes throughout. Exit status 2 means a run failed or a count was wrong.
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
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil
import psycopg
from _support import free_port, libpq, prefero_command
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
GOAL_SECONDS = 20.0
GOAL_RSS_GROWTH_MB = 300.0
MB = 1_000_000
SAMPLE_INTERVAL = 0.05
PROJECT_SLUG = "bench"
COMMON_WORDS = (
    "the a of to and in is that it for on with as be this are by you not or from at "
    "model answer question because however therefore example result data step first "
    "résumé naïve café über — … “quoted” 東京 😀"
)
MODELS = ("model-a", "model-b", "model-c", "model-d", "model-e", "model-f", "model-g", "model-h")


# --------------------------------------------------------------------------- data generation


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    """Pseudo-words built from syllables, with some real words and a little non-ASCII text."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["qu", "th", "sh", "ch"]
    common = COMMON_WORDS.split()
    words = set(common)
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _corpus(rng: random.Random, chars: int) -> str:
    vocab = _vocabulary(rng)
    punct = [" "] * 14 + [", "] * 2 + [". ", "; ", "? ", "! ", ".\n"]
    parts: list[str] = []
    total = 0
    while total < chars:
        words = rng.choices(vocab, k=64)
        seps = rng.choices(punct, k=64)
        chunk = "".join(w + s for w, s in zip(words, seps, strict=True))
        parts.append(chunk)
        total += len(chunk)
    return "".join(parts)


def generate(path: Path, *, prompts: int, completions: int, text_chars: int, seed: int) -> int:
    """Write ``prompts`` JSONL records with explicit ids; return the file size in bytes."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 4_000_000)
    limit = len(corpus) - 2 * text_chars - 1

    def snippet(length: int) -> str:
        start = rng.randrange(limit)
        start = corpus.find(" ", start) + 1  # start on a word boundary
        return corpus[start : start + length].strip()

    with path.open("wb", buffering=1 << 20) as f:
        for i in range(prompts):
            record = {
                "id": f"bench-{i:07d}",
                "prompt": snippet(rng.randint(60, 240)) + "?",
                "completions": [
                    {
                        "id": f"c{j}",
                        "text": snippet(rng.randint(text_chars * 4 // 5, text_chars * 6 // 5)),
                        "model": MODELS[j % len(MODELS)],
                        "params": {"temperature": round(rng.uniform(0.2, 1.2), 2)},
                    }
                    for j in range(completions)
                ],
                "metadata": {"source": "bench", "n": i, "split": "train" if i % 10 else "test"},
            }
            f.write(orjson.dumps(record))
            f.write(b"\n")
    return path.stat().st_size


def parse_only(path: Path) -> tuple[float, int]:
    """Seconds to decode every line with orjson (no validation, no database)."""
    loads = orjson.loads
    n = 0
    t0 = time.perf_counter()
    with path.open("rb", buffering=1 << 20) as f:
        for line in f:
            if line.strip():
                loads(line)
                n += 1
    return time.perf_counter() - t0, n


def parse_and_validate(path: Path) -> tuple[float, int]:
    """Seconds for prefero's own streaming parser + validator (no database)."""
    from app.importer import PromptIn, open_source, parse_records

    n = 0
    t0 = time.perf_counter()
    with path.open("rb") as raw:
        for item in parse_records(open_source(raw, max_bytes=1 << 40)):
            if not isinstance(item, PromptIn):
                raise SystemExit(f"generated file is invalid: {item}")
            n += 1
    return time.perf_counter() - t0, n


# --------------------------------------------------------------------------- databases


class Database:
    """A fresh, empty database for one run."""

    def __init__(self, backend: str, workdir: Path, pg_url: str) -> None:
        self.backend = backend
        self.data_dir = workdir / "data"
        self._pg_admin: str | None = None
        self.name = ""
        if backend == "sqlite":
            self.url = f"sqlite:///{self.data_dir / 'prefero.db'}"
        elif backend == "postgresql":
            server = make_url(pg_url)
            self.name = f"prefero_bench_{secrets.token_hex(4)}"
            self._pg_admin = libpq(pg_url)
            with psycopg.connect(self._pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = server.set(database=self.name).render_as_string(hide_password=False)
        else:
            raise SystemExit(f"unknown backend {backend!r} (sqlite or postgresql)")

    def counts(self, project_slug: str) -> tuple[int, int]:
        sql = (
            "SELECT (SELECT count(*) FROM prompt p JOIN project j ON j.id = p.project_id"
            "        WHERE j.slug = {ph}),"
            "       (SELECT count(*) FROM completion c JOIN prompt p ON p.id = c.prompt_id"
            "        JOIN project j ON j.id = p.project_id WHERE j.slug = {ph})"
        )
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.data_dir / "prefero.db")
            try:
                row = conn.execute(sql.format(ph="?"), (project_slug, project_slug)).fetchone()
            finally:
                conn.close()
        else:
            with psycopg.connect(libpq(self.url)) as conn:
                row = conn.execute(sql.format(ph="%s"), (project_slug, project_slug)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def size_mb(self) -> float:
        if self.backend == "sqlite":
            files = self.data_dir.glob("prefero.db*")
            return sum(p.stat().st_size for p in files) / MB
        with psycopg.connect(libpq(self.url)) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert row is not None
        return int(row[0]) / MB

    def drop(self) -> None:
        if self._pg_admin:
            with psycopg.connect(self._pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --------------------------------------------------------------------------- the server


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [prefero_command(), *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefero {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _get(port: int, path: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefero serve exited with status {proc.returncode}")
        try:
            if _get(port, "/readyz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"/readyz did not answer 200 within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree every ``SAMPLE_INTERVAL`` seconds until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(SAMPLE_INTERVAL)
        self._sample()

    def _sample(self) -> None:
        rss = _tree_rss(self.proc)
        self.peak = max(self.peak, rss)
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    backend: str
    seconds: float = 0.0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_samples: int = 0
    db_mb: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def growth(self) -> float:
        return self.rss_peak - self.rss_before


def upload(port: int, token: str, path: Path, size: int) -> tuple[int, bytes]:
    """Stream ``path`` from disk (1 MiB blocks, Content-Length set) and return the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800, blocksize=1 << 20)
    try:
        with path.open("rb") as body:
            conn.request(
                "POST",
                f"/api/v1/projects/{PROJECT_SLUG}/prompts",
                body=body,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/x-ndjson",
                    "Content-Length": str(size),
                },
            )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def run_once(backend: str, args: argparse.Namespace, path: Path, size: int) -> Run:
    run = Run(backend)
    workdir = Path(tempfile.mkdtemp(prefix=f"prefero-bench-{backend}-"))
    db = Database(backend, workdir, args.pg_url)
    server: subprocess.Popen[bytes] | None = None
    try:
        env = {
            **os.environ,
            "PREFERO_DATA_DIR": str(db.data_dir),
            "PREFERO_DATABASE_URL": db.url,
            "PREFERO_MAX_IMPORT_BYTES": str(max(size * 2, 200 * 1024 * 1024)),
        }
        _cli(env, "db", "upgrade")
        _cli(
            env,
            "users",
            "create",
            "bench-admin",
            "--role",
            "admin",
            "--password-stdin",
            stdin=secrets.token_urlsafe(16) + "\n",
        )
        token = _cli(env, "tokens", "create", "bench-admin").strip().splitlines()[-1].strip()
        _cli(env, "projects", "create", "--slug", PROJECT_SLUG, "--name", "Import benchmark")

        port = free_port()
        server = subprocess.Popen(
            [
                prefero_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        _wait_ready(port, server)
        time.sleep(0.5)  # let the process settle before the baseline
        sampler = RssSampler(server.pid)
        run.rss_before = _tree_rss(sampler.proc) / MB
        sampler.start()
        t0 = time.perf_counter()
        try:
            status, body = upload(port, token, path, size)
        finally:
            run.seconds = time.perf_counter() - t0
            sampler.stop()
        run.rss_peak = sampler.peak / MB
        run.rss_samples = sampler.samples

        if status != 201:
            run.errors.append(f"HTTP {status}: {body[:500]!r}")
            return run
        got = json.loads(body)
        want = {
            "created": args.prompts,
            "skipped": 0,
            "completions_created": args.prompts * args.completions,
            "completions_skipped": 0,
        }
        if got != want:
            run.errors.append(f"response {got} != expected {want}")
        rows = db.counts(PROJECT_SLUG)
        if rows != (args.prompts, args.prompts * args.completions):
            run.errors.append(
                f"database has {rows[0]} prompts / {rows[1]} completions, expected "
                f"{args.prompts} / {args.prompts * args.completions}"
            )
        run.db_mb = db.size_mb()
    except Exception as e:  # report and carry on with the other backends
        run.errors.append(f"{type(e).__name__}: {e}")
    finally:
        if server is not None:
            _stop(server)
        try:
            db.drop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


def _machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    cpus = os.cpu_count()
    return (
        f"{platform.system()} {platform.machine()}, {cpus} CPUs, {mem:.1f} GiB RAM, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def _pg_version(pg_url: str) -> str:
    try:
        with psycopg.connect(libpq(pg_url), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0]}" if row else "PostgreSQL ?"
    except psycopg.Error as e:
        return f"PostgreSQL unavailable ({str(e).strip().splitlines()[0]})"


def report(
    backend: str, runs: list[Run], args: argparse.Namespace, size: int, parse_s: float
) -> tuple[bool, bool]:
    """Print one backend's table; return (all runs correct, goals met)."""
    n, k = args.prompts, args.completions
    print(f"\n== {backend} ({len(runs)} run{'s' if len(runs) != 1 else ''}) ==")
    header = (
        f"{'run':>6} {'seconds':>8} {'prompts/s':>10} {'compl/s':>10} {'MB/s':>7} "
        f"{'RSS before':>10} {'RSS peak':>9} {'growth':>7} {'x parse':>8} {'DB MB':>7}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    good: list[Run] = []
    for i, r in enumerate(runs, 1):
        if r.errors:
            ok = False
            print(f"{i:>6} FAILED: {'; '.join(r.errors)}")
            if not r.seconds:
                continue
        else:
            good.append(r)
        print(_row(str(i), r.seconds, r.rss_before, r.rss_peak, r.db_mb, n, k, size, parse_s))
    if not good:
        print("no successful run")
        return False, False
    med = statistics.median(r.seconds for r in good)
    worst = max(good, key=lambda r: r.growth)
    if len(good) > 1:
        print(
            _row(
                "median",
                med,
                statistics.median(r.rss_before for r in good),
                statistics.median(r.rss_peak for r in good),
                statistics.median(r.db_mb for r in good),
                n,
                k,
                size,
                parse_s,
            )
        )
    print(f"RSS sampled every {SAMPLE_INTERVAL * 1000:.0f} ms ({worst.rss_samples} samples)")
    time_ok = med <= GOAL_SECONDS
    rss_ok = worst.growth <= GOAL_RSS_GROWTH_MB
    scope = "" if backend == "postgresql" else "   (informational: goals apply to PostgreSQL)"
    print(
        f"goal upload <= {GOAL_SECONDS:.0f} s:        {'PASS' if time_ok else 'FAIL'} "
        f"({med:.2f} s{' median' if len(good) > 1 else ''}){scope}"
    )
    print(
        f"goal RSS growth <= {GOAL_RSS_GROWTH_MB:.0f} MB: {'PASS' if rss_ok else 'FAIL'} "
        f"({worst.growth:.1f} MB{' worst run' if len(good) > 1 else ''}){scope}"
    )
    return ok, time_ok and rss_ok


def _row(
    label: str,
    secs: float,
    before: float,
    peak: float,
    db_mb: float,
    n: int,
    k: int,
    size: int,
    parse_s: float,
) -> str:
    return (
        f"{label:>6} {secs:>8.2f} {n / secs:>10,.0f} {n * k / secs:>10,.0f} "
        f"{size / MB / secs:>7.1f} {before:>10.1f} {peak:>9.1f} {peak - before:>7.1f} "
        f"{secs / parse_s:>7.1f}x {db_mb:>7.0f}"
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100_000, help="records (default 100000)")
    ap.add_argument("--completions", type=int, default=4, help="completions per record (4)")
    ap.add_argument("--text-chars", type=int, default=300, help="mean completion length (300)")
    ap.add_argument("--backends", default="sqlite,postgresql", help="comma-separated list")
    ap.add_argument("--repeat", type=int, default=1, help="runs per backend (median reported)")
    ap.add_argument("--seed", type=int, default=20240601, help="data generator seed")
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("PREFERO_BENCH_PG_URL", PG_DEFAULT),
        help=f"PostgreSQL server to create the bench database on ({PG_DEFAULT})",
    )
    ap.add_argument("--keep-file", action="store_true", help="keep the generated JSONL file")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.prompts < 1 or args.completions < 0 or args.repeat < 1:
        ap.error("--prompts and --repeat must be >= 1, --completions >= 0")

    print(f"machine: {_machine()}")
    if "postgresql" in backends:
        print(f"server:  {_pg_version(args.pg_url)}")
    tmp = Path(tempfile.mkdtemp(prefix="prefero-bench-data-"))
    path = tmp / f"prompts-{args.prompts}x{args.completions}.jsonl"
    try:
        t0 = time.perf_counter()
        size = generate(
            path,
            prompts=args.prompts,
            completions=args.completions,
            text_chars=args.text_chars,
            seed=args.seed,
        )
        print(
            f"data:    {path.name}: {args.prompts:,} prompts x {args.completions} completions "
            f"(~{args.text_chars} chars), {size / MB:.1f} MB, seed {args.seed} "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        parse_s, lines = min(parse_only(path) for _ in range(3))
        assert lines == args.prompts
        print(
            f"parse:   orjson.loads line by line, no validation, no DB: {parse_s:.2f} s "
            f"({size / MB / parse_s:.0f} MB/s; best of 3)"
        )
        valid_s, _ = parse_and_validate(path)
        print(
            f"         prefero parser + validator, no DB: {valid_s:.2f} s "
            f"({valid_s / parse_s:.1f}x parse-only)"
        )

        all_ok, pg_goals = True, True
        for backend in backends:
            runs = []
            for i in range(args.repeat):
                print(f"[{backend}] run {i + 1}/{args.repeat} …", flush=True)
                runs.append(run_once(backend, args, path, size))
            ok, goals = report(backend, runs, args, size, parse_s)
            all_ok &= ok
            if backend == "postgresql":
                pg_goals = goals
        print("\n'x parse' = upload seconds / parse-only seconds; DB MB = database size after.")
    finally:
        if args.keep_file:
            print(f"kept {path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not all_ok:
        print("RESULT: FAIL (a run failed or a count was wrong)")
        return 2
    if not pg_goals:
        print("RESULT: FAIL (a PostgreSQL goal was missed)")
        return 1
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
