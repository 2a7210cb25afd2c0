"""/api/v1/projects/{slug}/stats: the quality statistics as JSON, and one table as CSV (admin).

``GET …/stats.csv?table=annotators`` (the default), ``models``, ``pairs``, ``days`` or
``summary``; definitions in ``docs/metrics.md``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from app.deps import AdminUser, SessionDep, SettingsDep
from app.routes._responses import AUTHENTICATED, JSONBody, errors
from app.schemas import ProjectStats
from app.services import stats
from app.services.stats import CsvTable

router = APIRouter(prefix="/api/v1", tags=["stats"], responses=AUTHENTICATED)


@router.get("/projects/{slug}/stats", response_model=ProjectStats, responses=errors(404, 422))
def project_stats(slug: str, session: SessionDep, settings: SettingsDep, _: AdminUser) -> Response:
    """Progress, inter-annotator agreement (with a bootstrap 95 % interval), Krippendorff's alpha,
    each annotator's agreement, position and length biases (outliers flagged), and a
    Bradley–Terry leaderboard of the completions' models. Only current annotations count."""
    # Serialised here: FastAPI would validate the whole model again in another thread.
    return JSONBody(stats.project_stats(session, slug=slug, secret=settings.get_secret_key()))


@router.get("/projects/{slug}/stats.csv", response_class=Response, responses=errors(404, 422))
def project_stats_csv(
    slug: str,
    session: SessionDep,
    settings: SettingsDep,
    _: AdminUser,
    table: Annotated[CsvTable, Query(description="Which table of the statistics.")] = "annotators",
) -> Response:
    """One table of the statistics as CSV: annotators (one row each), models (the
    leaderboard), pairs (model against model), days (annotations per day) or summary."""
    name, text = stats.stats_csv(session, slug=slug, secret=settings.get_secret_key(), table=table)
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )
