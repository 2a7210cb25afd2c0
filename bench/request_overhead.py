"""Request-overhead benchmark: what the web stack costs a labeling call before any database work.

Run from the repository root with the project's virtual environment active::

    python bench/request_overhead.py                 # 7 rounds of 2,000 calls per route
    python bench/request_overhead.py --calls 500 --rounds 3 --json overhead.json

It builds the app (``app.main.create_app``, every middleware included) and calls it in
process, through ASGI, with no server, socket or database: each call is an unauthenticated
request, answered 401 after routing, the middleware stack and dependency resolution, so the
figure is the per-request cost of the framework path the labeling routes share with every
request (the event loop's part of the work; the database work and the thread hop come on top
of it under load, see ``bench/annotate_load.py``). Routes:

- ``GET /api/v1/projects/{slug}/tasks/next`` and ``POST /api/v1/leases/{id}/submit``: the
  labeling routes (one dependency, the session opened in the endpoint's thread);
- ``GET /api/v1/projects/{slug}`` (baseline, measured in the same run): an admin route on the
  general dependency chain (session generator, ``AdminUser`` → ``CurrentUser`` with the bearer
  and cookie security dependencies), as the labeling routes had before.

It prints the median µs per call of each route over ``--rounds`` rounds of ``--calls`` calls
and the ratio to the baseline. Goal (exit status 1 when missed, unless ``--no-goals``): each
labeling route at most 0.75 × the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROUTES = (
    ("next", "GET", "/api/v1/projects/demo/tasks/next"),
    ("submit", "POST", "/api/v1/leases/5/submit"),
    ("baseline", "GET", "/api/v1/projects/demo"),
)
GOAL_RATIO = 0.75


def _scope(method: str, path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-length", b"0")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def _call(app, method: str, path: str) -> int:
    """One request through the whole ASGI app → its status."""
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path), receive, send)
    return status


async def _measure(app, *, calls: int, rounds: int) -> dict[str, list[float]]:
    """µs per call of each route, one figure per round. Rounds are interleaved (route A, B, C,
    A, B, C, …) so that a slower minute of a noisy machine falls on every route alike."""
    for _, method, path in ROUTES:
        statuses = {await _call(app, method, path) for _ in range(200)}  # warm-up
        if statuses != {401}:
            raise SystemExit(f"{method} {path}: expected 401 only, got {sorted(statuses)}")
    samples: dict[str, list[float]] = {name: [] for name, _, _ in ROUTES}
    for _ in range(rounds):
        for name, method, path in ROUTES:
            t0 = time.perf_counter()
            for _ in range(calls):
                await _call(app, method, path)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per route (7)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-goals", action="store_true", help="report only")
    args = parser.parse_args()

    os.environ.setdefault("PREFERO_LOG_FORMAT", "text")
    from app.config import Settings
    from app.main import create_app

    with tempfile.TemporaryDirectory(prefix="prefero-overhead-") as tmp:
        settings = Settings(
            data_dir=Path(tmp), database_url=f"sqlite:///{tmp}/unused.db", secret_key="bench"
        )
        app = create_app(settings)
        logging.disable(logging.CRITICAL)  # the access log would measure the terminal
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {platform.platform()} · "
            f"{os.cpu_count()} CPUs · Python {platform.python_version()} · load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        samples = asyncio.run(_measure(app, calls=args.calls, rounds=args.rounds))
        app.state.engine.dispose()
    base = statistics.median(samples["baseline"])
    results, failures = {}, []
    for name, method, path in ROUTES:
        median = statistics.median(samples[name])
        ratio = median / base
        results[name] = {"path": f"{method} {path}", "median_us": median, "ratio": ratio}
        print(f"{method:4} {path:36} median {median:6.0f} µs per call · {ratio:.2f}× baseline")
        if name != "baseline" and ratio > GOAL_RATIO:
            failures.append(f"{name}: {ratio:.2f}× the baseline (goal ≤ {GOAL_RATIO})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for failure in failures:
        print(f"GOAL MISSED: {failure}")
    return 1 if failures and not args.no_goals else 0


if __name__ == "__main__":
    sys.exit(main())
