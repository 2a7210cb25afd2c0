"""The quality dashboard of a project (admins): progress, agreement, each annotator's biases
with outliers highlighted, the model leaderboard; server-rendered SVG charts beside their data
tables, and CSV downloads. Its JSON twin is ``GET /api/v1/projects/{slug}/stats``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from app.charts import Bar, Dot, RefLine, Segment, bar_chart, dot_chart, stacked_bar
from app.deps import OptionalWebUser, SessionDep
from app.errors import NotFound
from app.models import Role
from app.routes._web import gettext_for, render, render_error, to_login
from app.schemas import ProjectStats
from app.services import stats

router = APIRouter(include_in_schema=False)

CHART_DAYS = 60
"""Days the activity chart and its table show (the CSV has them all)."""


@router.get("/admin/projects/{slug}/dashboard", response_class=HTMLResponse)
def dashboard(request: Request, slug: str, session: SessionDep, web: OptionalWebUser) -> Response:
    if web is None:
        return to_login(request)
    _ = gettext_for(request)
    if web.user.role != Role.admin:
        return render_error(
            request,
            login=web,
            status_code=403,
            heading=_("Administrators only"),
            message=_("This page is for administrators. Ask one to give you the admin role."),
        )
    try:
        data = stats.project_stats(
            session, slug=slug, secret=request.app.state.settings.get_secret_key()
        )
    except NotFound:
        return render_error(
            request,
            login=web,
            status_code=404,
            heading=_("Project not found"),
            message=_("There is no project with this name."),
        )
    return render(
        request,
        "admin/dashboard.html",
        login=web,
        stats=data,
        days=data.progress.days[-CHART_DAYS:],
        charts=_charts(data, _),
    )


def _charts(data: ProjectStats, _: Callable[[str], str]) -> dict[str, Markup]:
    p = data.progress
    days = p.days[-CHART_DAYS:]
    rule = data.outlier_rule
    rated = [a for a in data.annotators if a.consensus is not None]
    refs = []
    if rule.median is not None:
        refs.append(RefLine(rule.median, _("Median"), "chart-ref"))
    if rule.threshold is not None:
        refs.append(RefLine(rule.threshold, _("Outlier threshold"), "chart-ref chart-ref-alert"))
    low = min([m.ci_low for m in data.models if m.ci_low is not None] + [-1.0])
    high = max([m.ci_high for m in data.models if m.ci_high is not None] + [1.0])
    return {
        "progress": stacked_bar(
            "chart-progress",
            title=_("Prompts by progress"),
            desc=_("%(complete)s complete, %(started)s in progress, %(untouched)s untouched.")
            % {"complete": p.complete, "started": p.in_progress, "untouched": p.untouched},
            segments=[
                Segment(_("Complete"), p.complete, "series-1"),
                Segment(_("In progress"), p.in_progress, "series-2"),
                Segment(_("Untouched"), p.untouched, "series-empty"),
            ],
        ),
        "days": bar_chart(
            "chart-days",
            title=_("Annotations per day"),
            desc=_("Submitted and skipped annotations per UTC day, the last %(n)s days.")
            % {"n": len(days)},
            bars=[Bar(d.day.isoformat(), (d.submitted, d.skipped)) for d in days],
            series=[(_("Submitted"), "series-1"), (_("Skipped"), "series-3")],
        ),
        "annotators": dot_chart(
            "chart-annotators",
            title=_("Agreement with the other annotators' consensus"),
            desc=_(
                "One row per annotator: the share of pairs ranked like the majority of the "
                "other annotators of the same prompts. Outliers are highlighted."
            ),
            dots=[
                Dot(
                    a.username,
                    a.consensus,
                    highlight=a.outlier,
                    note=_("outlier") if a.outlier else "",
                )
                for a in rated
            ],
            domain=(0.0, 1.0),
            refs=refs,
            percent=True,
        ),
        "models": dot_chart(
            "chart-models",
            title=_("Model strengths (Bradley–Terry)"),
            desc=_("Log-strength of each model with its bootstrap 95 % interval, best first."),
            dots=[Dot(m.model, m.strength, m.ci_low, m.ci_high) for m in data.models],
            domain=(low, high),
            refs=[RefLine(0.0, _("Average model"))],
        ),
    }
