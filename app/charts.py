"""Small server-rendered SVG charts for the admin dashboard (pure: no database, no web
framework). Every chart is an ``<svg role="img">`` with a ``<title>`` and a ``<desc>`` (named
by ``aria-labelledby``), every text escaped; the page shows the same numbers in a table beside
it. Colours come from CSS classes (``app/static/css/app.css``, "dashboard"), so the charts
need no inline style and follow the page's palette.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 640


@dataclass(frozen=True, slots=True)
class Segment:
    label: str
    value: float
    css: str


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    values: tuple[float, ...]
    """Stacked from the bottom, one per series."""


@dataclass(frozen=True, slots=True)
class Dot:
    label: str
    value: float | None
    low: float | None = None
    high: float | None = None
    highlight: bool = False
    note: str = ""


@dataclass(frozen=True, slots=True)
class RefLine:
    value: float
    label: str
    css: str = "chart-ref"


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _open(uid: str, title: str, desc: str, height: float, css: str) -> list[str]:
    return [
        f'<svg class="chart {escape(css)}" viewBox="0 0 {WIDTH} {_num(height)}" role="img" '
        f'aria-labelledby="{escape(uid)}-title {escape(uid)}-desc" id="{escape(uid)}" '
        'preserveAspectRatio="xMinYMin meet" focusable="false">',
        f'<title id="{escape(uid)}-title">{escape(title)}</title>',
        f'<desc id="{escape(uid)}-desc">{escape(desc)}</desc>',
    ]


def stacked_bar(uid: str, *, title: str, desc: str, segments: Sequence[Segment]) -> Markup:
    """One horizontal bar split into segments (their share of the total), with a legend."""
    total = sum(max(s.value, 0) for s in segments)
    height = 64
    out = _open(uid, title, desc, height, "chart-stacked")
    x = 0.0
    for s in segments:
        w = WIDTH * max(s.value, 0) / total if total else 0.0
        if w > 0:
            out.append(
                f'<rect class="{escape(s.css)}" x="{_num(x)}" y="0" width="{_num(w)}" '
                f'height="28"><title>{escape(s.label)}: {escape(_num(s.value))}</title></rect>'
            )
        x += w
    if not total:
        out.append(f'<rect class="chart-empty" x="0" y="0" width="{WIDTH}" height="28"></rect>')
    lx = 0
    for s in segments:
        out.append(f'<rect class="{escape(s.css)}" x="{lx}" y="42" width="12" height="12"></rect>')
        text = f"{s.label} ({_num(s.value)})"
        out.append(f'<text class="chart-label" x="{lx + 16}" y="53">{escape(text)}</text>')
        lx += 24 + 7 * len(text)
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(
    uid: str,
    *,
    title: str,
    desc: str,
    bars: Sequence[Bar],
    series: Sequence[tuple[str, str]],
) -> Markup:
    """Vertical stacked bars (one per label, e.g. per day); ``series`` = (name, css class)."""
    height, top, bottom, left = 200, 16, 36, 40
    plot_h = height - top - bottom
    plot_w = WIDTH - left - 8
    peak = max((sum(b.values) for b in bars), default=0) or 1
    out = _open(uid, title, desc, height, "chart-bars")
    out.append(
        f'<line class="chart-axis" x1="{left}" y1="{top + plot_h}" x2="{WIDTH - 8}" '
        f'y2="{top + plot_h}"></line>'
    )
    out.append(
        f'<text class="chart-label" x="{left - 4}" y="{top + 4}" text-anchor="end">'
        f"{escape(_num(peak))}</text>"
    )
    out.append(
        f'<text class="chart-label" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
    )
    step = plot_w / max(len(bars), 1)
    width = min(max(step * 0.8, 1), 28)
    for i, b in enumerate(bars):
        x = left + i * step + (step - width) / 2
        y = top + plot_h
        for value, (name, css) in zip(b.values, series, strict=False):
            h = plot_h * value / peak
            if h <= 0:
                continue
            y -= h
            out.append(
                f'<rect class="{escape(css)}" x="{_num(x)}" y="{_num(y)}" width="{_num(width)}" '
                f'height="{_num(h)}"><title>{escape(b.label)} · {escape(name)}: '
                f"{escape(_num(value))}</title></rect>"
            )
    if bars:
        out.append(
            f'<text class="chart-label" x="{left}" y="{height - 14}">{escape(bars[0].label)}</text>'
        )
        out.append(
            f'<text class="chart-label" x="{WIDTH - 8}" y="{height - 14}" text-anchor="end">'
            f"{escape(bars[-1].label)}</text>"
        )
    lx = left + 160
    for name, css in series:
        out.append(
            f'<rect class="{escape(css)}" x="{lx}" y="{height - 24}" width="12" height="12"></rect>'
        )
        out.append(
            f'<text class="chart-label" x="{lx + 16}" y="{height - 14}">{escape(name)}</text>'
        )
        lx += 30 + 7 * len(name)
    out.append("</svg>")
    return Markup("".join(out))


def dot_chart(
    uid: str,
    *,
    title: str,
    desc: str,
    dots: Sequence[Dot],
    domain: tuple[float, float],
    refs: Sequence[RefLine] = (),
    percent: bool = False,
) -> Markup:
    """One row per item: a dot at its value, a whisker from ``low`` to ``high`` when given;
    highlighted rows are drawn in the alert colour with a ring (not by colour alone)."""
    row, top, left, right = 22, 26, 170, 16
    height = top + row * max(len(dots), 1) + 10
    lo, hi = domain
    span = (hi - lo) or 1.0
    plot_w = WIDTH - left - right

    def x_of(v: float) -> float:
        return left + plot_w * (min(max(v, lo), hi) - lo) / span

    def fmt(v: float) -> str:
        return f"{v * 100:.0f} %" if percent else f"{v:.2f}"

    out = _open(uid, title, desc, height, "chart-dots")
    for v in (lo, (lo + hi) / 2, hi):
        out.append(
            f'<line class="chart-grid" x1="{_num(x_of(v))}" y1="{top - 6}" x2="{_num(x_of(v))}" '
            f'y2="{height - 6}"></line>'
        )
        out.append(
            f'<text class="chart-label" x="{_num(x_of(v))}" y="{top - 10}" '
            f'text-anchor="middle">{escape(fmt(v))}</text>'
        )
    for ref in refs:
        x = _num(x_of(ref.value))
        out.append(
            f'<line class="{escape(ref.css)}" x1="{x}" y1="{top - 6}" x2="{x}" y2="{height - 6}">'
            f"<title>{escape(ref.label)}: {escape(fmt(ref.value))}</title></line>"
        )
    for i, d in enumerate(dots):
        y = top + row * i + row / 2
        css = "chart-dot chart-dot-alert" if d.highlight else "chart-dot"
        label = d.label if len(d.label) <= 22 else d.label[:21] + "…"
        out.append(
            f'<text class="chart-label{" chart-label-alert" if d.highlight else ""}" '
            f'x="{left - 14}" y="{_num(y + 4)}" text-anchor="end">{escape(label)}</text>'
        )
        if d.value is None:
            continue
        if d.low is not None and d.high is not None:
            out.append(
                f'<line class="chart-whisker" x1="{_num(x_of(d.low))}" y1="{_num(y)}" '
                f'x2="{_num(x_of(d.high))}" y2="{_num(y)}"></line>'
            )
        tip = f"{d.label}: {fmt(d.value)}"
        if d.low is not None and d.high is not None:
            tip += f" [{fmt(d.low)}, {fmt(d.high)}]"
        if d.note:
            tip += f" — {d.note}"
        out.append(
            f'<circle class="{css}" cx="{_num(x_of(d.value))}" cy="{_num(y)}" r="5">'
            f"<title>{escape(tip)}</title></circle>"
        )
        if d.highlight:
            out.append(
                f'<circle class="chart-ring" cx="{_num(x_of(d.value))}" cy="{_num(y)}" r="9">'
                "</circle>"
            )
    out.append("</svg>")
    return Markup("".join(out))
