"""Small SVG charts for the admin console, drawn on the server as HTML strings.

Why not Gradio's plots: they drew an empty frame with a ``NaN`` legend when there was no
data, cannot draw an interval, and put metrics of different scales on one axis. These are a
few dozen lines each, say "no data yet" in words, and a test can read what they were given:
each mark carries its value in ``data-value`` (bars, points) and every chart its kind in
``data-chart``. Every text that reaches them is escaped here (:func:`esc`).
"""

from __future__ import annotations

import html
import math

W, H = 460, 190  # viewBox; the SVG scales to its box's width
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 26, 36
COLORS = {"up": "#2f9e44", "down": "#e03131", "candidate": "#1c7ed6", "live": "#868e96"}
PALETTE = ("#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00")


def esc(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x and abs(x) < 1000 else f"{x:,.0f}"


def empty(chart: str, title: str, message: str) -> str:
    return (f'<div class="ac-chart ac-empty" data-chart="{esc(chart)}"><div class="ac-title">{esc(title)}</div>'
            f'<div class="ac-none">{esc(message)}</div></div>')


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: list[float], fixed: tuple[float, float] | None, zero: bool = False) -> tuple[float, float]:
    if fixed:
        return fixed
    lo, hi = min(values), max(values)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return (lo if zero and lo == 0 else lo - pad), (hi if zero and hi == 0 else hi + pad)


def _frame(chart: str, title: str, y: tuple[float, float], y_label: str, body: str, legend: str = "") -> str:
    def sy(v: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - (v - y[0]) / (y[1] - y[0]))

    grid = "".join(
        f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="ac-grid"/>'
        f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="ac-tick">{esc(_fmt(t))}</text>'
        for t in _ticks(*y)
    )
    return (f'<div class="ac-chart" data-chart="{esc(chart)}"><div class="ac-title">{esc(title)}</div>{legend}'
            f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">{grid}'
            f'<text x="12" y="{(TOP + H - BOTTOM) / 2:.0f}" transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2:.0f})" '
            f'text-anchor="middle" class="ac-axis">{esc(y_label)}</text>{body}</svg></div>')


def _legend(names: list[str], colors: dict[str, str]) -> str:
    return '<div class="ac-legend">' + "".join(
        f'<span><i style="background:{colors[n]}"></i>{esc(n)}</span>' for n in names) + "</div>"


def _x_positions(n: int) -> list[float]:
    span = W - LEFT - RIGHT
    return [LEFT + span * (i + 0.5) / n for i in range(n)]


def _x_labels(labels: list[str], xs: list[float]) -> str:
    every = max(1, math.ceil(len(labels) / 8))  # at most ~8 labels fit under the axis
    return "".join(
        f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" class="ac-tick">{esc(lab)}</text>'
        for i, (lab, x) in enumerate(zip(labels, xs)) if i % every == 0 or i == len(labels) - 1
    )


def bars(chart: str, title: str, categories: list[str], series: dict[str, list[float]], y_label: str,
         empty_message: str, colors: dict[str, str] | None = None) -> str:
    """Grouped bars: one group per category, one bar per series (e.g. up and down per day)."""
    if not categories or not any(v for vals in series.values() for v in vals):
        return empty(chart, title, empty_message)
    colors = colors or {n: COLORS.get(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(series)}
    y = _range([v for vals in series.values() for v in vals], None, zero=True)
    xs = _x_positions(len(categories))
    group = min((W - LEFT - RIGHT) / len(categories) * 0.8, 40.0 * len(series))  # one day is not a wall of colour
    width = group / len(series)
    sy = lambda v: TOP + (H - TOP - BOTTOM) * (1 - (v - y[0]) / (y[1] - y[0]))  # noqa: E731
    body = []
    for k, (name, vals) in enumerate(series.items()):
        for cat, x, v in zip(categories, xs, vals):
            x0 = x - group / 2 + k * width
            top, base = sy(max(v, 0)), sy(min(v, 0))
            body.append(f'<rect class="ac-bar" data-series="{esc(name)}" data-x="{esc(cat)}" data-value="{v:g}" '
                        f'x="{x0:.1f}" y="{top:.1f}" width="{max(width - 1, 1):.1f}" height="{max(base - top, 0.5):.1f}" '
                        f'fill="{colors[name]}"><title>{esc(cat)}: {v:g} {esc(name)}</title></rect>')
            if len(categories) * len(series) <= 16 and v:
                body.append(f'<text x="{x0 + width / 2:.1f}" y="{top - 4:.1f}" text-anchor="middle" class="ac-tick">{v:g}</text>')
    body.append(_x_labels(categories, xs))
    return _frame(chart, title, y, y_label, "".join(body), _legend(list(series), colors))


def lines(chart: str, title: str, series: dict[str, list[tuple[float, float]]], y_label: str, x_label: str,
          empty_message: str, y_range: tuple[float, float] | None = None, x_range: tuple[float, float] | None = None) -> str:
    """Lines over a numeric x (e.g. loss per step); points get ``data-value``."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return empty(chart, title, empty_message)
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(series)}
    y = _range([v for _, v in points], y_range)
    x0, x1 = x_range or (min(x for x, _ in points), max(x for x, _ in points))
    x1 = x1 if x1 > x0 else x0 + 1
    sx = lambda v: LEFT + (W - LEFT - RIGHT) * (v - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: TOP + (H - TOP - BOTTOM) * (1 - (min(max(v, y[0]), y[1]) - y[0]) / (y[1] - y[0]))  # noqa: E731
    body = []
    for name, pts in series.items():
        if not pts:
            continue
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
        dots = pts if len(pts) <= 40 else pts[-1:]
        body += [f'<circle class="ac-point" data-series="{esc(name)}" data-x="{a:g}" data-value="{b:g}" cx="{sx(a):.1f}" '
                 f'cy="{sy(b):.1f}" r="3" fill="{colors[name]}"><title>{esc(name)} at {a:g}: {b:.4g}</title></circle>' for a, b in dots]
    ticks = _ticks(x0, x1, 5)
    if all(float(x).is_integer() for x, _ in points):  # steps: no step 1.5 on the axis
        ticks = [t for t in ticks if float(t).is_integer()]
    body += [f'<text x="{sx(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" class="ac-tick">{esc(_fmt(t))}</text>'
             for t in ticks if x0 <= t <= x1]
    body.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 4}" text-anchor="middle" class="ac-axis">{esc(x_label)}</text>')
    legend = _legend(list(series), colors) if len(series) > 1 else ""
    return _frame(chart, title, y, y_label, "".join(body), legend)


def categories_line(chart: str, title: str, points: list[tuple[str, float]], y_label: str, empty_message: str,
                    y_range: tuple[float, float] | None = None, reference: list[tuple[str, float]] | None = None,
                    names: tuple[str, str] = ("version", "live version it was gated against")) -> str:
    """One metric across named categories (versions), on its own axis; ``reference`` (grey,
    hollow) is what each was compared with, e.g. the live version's value on the same data."""
    if not points:
        return empty(chart, title, empty_message)
    ref = dict(reference or [])
    y = _range([v for _, v in points] + [ref[lab] for lab, _ in points if lab in ref], y_range)
    xs = _x_positions(len(points))
    sy = lambda v: TOP + (H - TOP - BOTTOM) * (1 - (v - y[0]) / (y[1] - y[0]))  # noqa: E731
    path = " ".join(f"{x:.1f},{sy(v):.1f}" for x, (_, v) in zip(xs, points))
    body = [f'<polyline points="{path}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>']
    body += [f'<circle class="ac-ref" data-x="{esc(lab)}" data-value="{ref[lab]:g}" cx="{x:.1f}" cy="{sy(ref[lab]):.1f}" '
             f'r="4" fill="white" stroke="{COLORS["live"]}" stroke-width="2"><title>{esc(names[1])} for {esc(lab)}: '
             f'{ref[lab]:.4g}</title></circle>' for x, (lab, _) in zip(xs, points) if lab in ref]
    body += [f'<circle class="ac-point" data-x="{esc(lab)}" data-value="{v:g}" cx="{x:.1f}" cy="{sy(v):.1f}" r="4" '
             f'fill="{PALETTE[0]}"><title>{esc(lab)}: {v:.4g}</title></circle>'
             f'<text x="{x:.1f}" y="{sy(v) - 8:.1f}" text-anchor="middle" class="ac-label">{esc(_fmt(v))}</text>'
             for x, (lab, v) in zip(xs, points)]
    body.append(_x_labels([lab for lab, _ in points], xs))
    legend = _legend(list(names), {names[0]: PALETTE[0], names[1]: COLORS["live"]}) if ref else ""
    return _frame(chart, title, y, y_label, "".join(body), legend)


def intervals(chart: str, title: str, rows: list[dict], y_label: str, empty_message: str) -> str:
    """A rate per category with its interval: rows of {version, rate, low, high, votes}, on 0-1."""
    if not rows:
        return empty(chart, title, empty_message)
    y = (0.0, 1.0)
    xs = _x_positions(len(rows))
    sy = lambda v: TOP + (H - TOP - BOTTOM) * (1 - v)  # noqa: E731
    body = []
    for x, r in zip(xs, rows):
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{sy(r["low"]):.1f}" y2="{sy(r["high"]):.1f}" class="ac-whisker"/>'
            f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{sy(r["low"]):.1f}" y2="{sy(r["low"]):.1f}" class="ac-whisker"/>'
            f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{sy(r["high"]):.1f}" y2="{sy(r["high"]):.1f}" class="ac-whisker"/>'
            f'<circle class="ac-point" data-x="{esc(r["version"])}" data-value="{r["rate"]:.4f}" cx="{x:.1f}" '
            f'cy="{sy(r["rate"]):.1f}" r="5" fill="{PALETTE[0]}"><title>{esc(r["version"])}: {r["rate"]:.0%} up of '
            f'{r["votes"]} votes (95% interval {r["low"]:.0%}-{r["high"]:.0%})</title></circle>'
            f'<text x="{x + 9:.1f}" y="{sy(r["rate"]) + 4:.1f}" class="ac-label">{r["rate"]:.0%} of {r["votes"]}</text>'
        )
    body.append(_x_labels([r["version"] for r in rows], xs))
    return _frame(chart, title, y, y_label, "".join(body))


def progress_bar(fraction: float, label: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="ac-progress" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" aria-valuemax="100">'
            f'<div class="ac-fill" style="width:{pct:.1f}%"></div><span>{esc(label)}</span></div>')


CSS = """
.ac-chart { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; background: var(--background-fill-primary); }
.ac-chart svg { width: 100%; height: auto; display: block; }
.ac-title { font-weight: 600; font-size: 14px; margin-bottom: 2px; }
.ac-none { color: var(--body-text-color-subdued); padding: 36px 0; text-align: center; font-size: 15px; }
.ac-grid { stroke: var(--border-color-primary); stroke-width: 1; }
.ac-tick { font-size: 12px; fill: #495057; }
.ac-label { font-size: 12px; fill: #1c7ed6; font-weight: 600; }
.ac-axis { font-size: 12px; fill: var(--body-text-color); }
.ac-whisker { stroke: #495057; stroke-width: 1.5; }
.ac-legend { display: flex; gap: 14px; font-size: 12px; }
.ac-legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
.ac-grid-2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr)); gap: 12px; }
.ac-grid-3 { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px; }
.ac-progress { position: relative; height: 26px; border-radius: 6px; background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); overflow: hidden; margin: 8px 0; }
.ac-fill { position: absolute; inset: 0 auto 0 0; background: #74c0fc; }
.ac-progress span { position: relative; padding-left: 10px; line-height: 26px; font-size: 13px; font-weight: 600; }
.ac-stages { display: flex; gap: 6px; flex-wrap: wrap; margin: 6px 0; }
.ac-stage { padding: 3px 10px; border-radius: 999px; font-size: 13px; border: 1px solid var(--border-color-primary); color: var(--body-text-color-subdued); }
.ac-stage.done { background: #d3f9d8; color: #2b8a3e; border-color: #8ce99a; }
.ac-stage.failed { background: #ffe3e3; color: #c92a2a; border-color: #ffa8a8; font-weight: 600; }
.ac-stage.now { background: #d0ebff; color: #1864ab; border-color: #74c0fc; font-weight: 600; }
.ac-sentence { font-size: 16px; margin: 8px 0; }
.ac-sentence.bad { color: #c92a2a; }
.ac-sentence.good { color: #2b8a3e; }
.ac-sentence.warn { color: #d9480f; }
.ac-meta { color: var(--body-text-color-subdued); font-size: 13px; }
.ac-cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 10px; margin: 8px 0; }
.ac-card { border-radius: 8px; padding: 10px 12px; border: 2px solid; }
.ac-card.pass { border-color: #8ce99a; background: #ebfbee; }
.ac-card.fail { border-color: #ffa8a8; background: #fff5f5; }
.ac-card h4 { margin: 0 0 6px; font-size: 15px; }
.ac-card .ac-badge { float: right; font-size: 12px; font-weight: 700; letter-spacing: .06em; }
.ac-card.pass .ac-badge { color: #2b8a3e; } .ac-card.fail .ac-badge { color: #c92a2a; }
.ac-card dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; margin: 0; font-size: 13px; color: #212529; }
.ac-card dt { color: #495057; } .ac-card dd { margin: 0; font-weight: 600; }
.ac-card p { margin: 6px 0 0; font-size: 12px; color: #495057; }
.ac-compare { width: 100%; border-collapse: collapse; table-layout: fixed; font-size: 13px; }
.ac-compare th, .ac-compare td { border-bottom: 1px solid var(--border-color-primary); padding: 6px 8px; vertical-align: top; text-align: left; overflow-wrap: anywhere; }
.ac-compare th { background: var(--background-fill-secondary); }
.ac-compare col.q { width: 22%; }
.ac-compare tr.same td { color: var(--body-text-color-subdued); }
.ac-compare del { background: #ffe3e3; color: #c92a2a; text-decoration: line-through; }
.ac-compare ins { background: #d3f9d8; color: #2b8a3e; text-decoration: none; }
.ac-tag { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 4px; margin-right: 4px; background: var(--background-fill-secondary); }
.ac-tag.lost { background: #ffe3e3; color: #c92a2a; } .ac-tag.gained { background: #d3f9d8; color: #2b8a3e; }
.ac-summary ul { margin: 4px 0; padding-left: 20px; } .ac-summary li { margin: 2px 0; }
.ac-details { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 2px 16px; font-size: 13px; }
"""
