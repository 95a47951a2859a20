"""The admin console's readable parts as HTML: the training job live, the gate's verdict as
cards, old and new answers side by side, the feedback in sentences, a version's details.

Built from ``loop.reports`` views; every text from users, models or rows is escaped
(``ui.charts.esc``): answers and prompts are whatever users and models wrote.
"""

from __future__ import annotations

from loop import reports

from . import charts
from .charts import esc


def job_panel(view: dict | None) -> str:
    """Stages, a progress bar with steps, elapsed and time left, the curves, one sentence."""
    if view is None:
        return '<div class="ac-job" data-status="none"><div class="ac-sentence">No training job yet.</div></div>'
    state = {"succeeded": "good" if view["gate_passed"] is not False else "warn", "failed": "bad",
             "cancelled": "bad"}.get(view["status"], "")
    stages = "".join(f'<span class="ac-stage {s["state"]}">{esc(s["name"])}</span>' for s in view["stages"])
    if view["steps"]:
        label = f"step {view['step']} of {view['steps']}"
    else:
        label = view["stage"]
    label += f" · {reports.duration(view['elapsed'])} elapsed"
    if view["eta"] is not None:
        label += f" · about {reports.duration(view['eta'])} left"
    fraction = 1.0 if view["status"] == "succeeded" else view["fraction"]
    last = ", ".join(f"{name} {v:.3g}" for name, v in view["last"].items() if isinstance(v, int | float))
    curves = "".join(
        charts.lines(f"curve-{name.replace(' ', '-')}", name, {name: pts}, name, "step",
                     "The curve starts after the first step.",
                     y_range=(0.0, 1.0) if name == "reward accuracy" else None,
                     x_range=(1, view["steps"]) if view["steps"] else None)
        for name, pts in view["curves"].items()
    )
    head = (f'<div class="ac-meta">Job {esc(view["id"])} · {esc(view["status"])}'
            + (f' · started by {esc(view["created_by"])}' if view["created_by"] else "") + "</div>")
    return (f'<div class="ac-job" data-status="{esc(view["status"])}" data-stage="{esc(view["stage"])}">{head}'
            f'<div class="ac-stages">{stages}</div>{charts.progress_bar(fraction, label)}'
            f'<div class="ac-sentence {state}">{esc(view["sentence"])}</div>'
            + (f'<div class="ac-meta">Last step: {esc(last)}</div>' if last else "")
            + f'<div class="ac-grid-3">{curves}</div></div>')


def verdict_cards(version: int, eval_json: dict, passed: bool | None) -> str:
    """One card per gate check, in the order the gate recorded them."""
    checks = reports.verdict(eval_json)
    if not checks:
        return f'<div class="ac-verdict"><p>v{version} has no gate record.</p></div>'
    live = reports.version_label(eval_json.get("live_version"))
    failed = [c["check"] for c in checks if not c["passed"]]
    head = (f"The gate passed v{version} against {live}: every check held." if not failed else
            f"The gate refused v{version} against {live}: {', '.join(failed)} failed.")
    cards = []
    for c in checks:
        rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(reports.figure(c[key]))}</dd>"
                       for k, key in ((f"v{version}", "value"), (live, "live"), ("needs", "threshold")) if c[key] is not None)
        cards.append(
            f'<div class="ac-card {"pass" if c["passed"] else "fail"}" data-check="{esc(c["check"])}">'
            f'<span class="ac-badge">{"PASSED" if c["passed"] else "FAILED"}</span><h4>{esc(c["check"])}</h4>'
            f'<dl>{rows}</dl><p>{esc(c["detail"])}</p></div>')
    cls = "good" if not failed else "bad"
    return (f'<div class="ac-verdict" data-passed="{str(not failed).lower()}"><div class="ac-sentence {cls}">{esc(head)}</div>'
            f'<div class="ac-cards">{"".join(cards)}</div></div>')


def _diffed(diff: list[tuple[str, str]], side: str) -> str:
    keep = {"live": ("same", "del"), "candidate": ("same", "ins")}[side]
    tag = {"del": "del", "ins": "ins"}
    return "".join(f"<{tag[op]}>{esc(t)}</{tag[op]}>" if op in tag else esc(t) for op, t in diff if op in keep)


def comparison_table(version: int, eval_json: dict) -> str:
    """Live and candidate answers per prompt, what changed marked (removed red, added green)."""
    rows = reports.comparison(eval_json)
    if not rows:
        return f'<div class="ac-comparison"><p>No answers were stored with v{version}.</p></div>'
    live = reports.version_label(eval_json.get("live_version"))
    counts = reports.comparison_counts(rows)
    head = f"{counts['changed']} of {counts['total']} answers changed from {live} to v{version}"
    if counts["golden_lost"]:
        head += f"; golden answers lost: {len(counts['golden_lost'])}"
    if counts["golden_gained"]:
        head += f"; golden answers gained: {len(counts['golden_gained'])}"
    body = []
    for r in rows:
        tags = f'<span class="ac-tag">{esc(r["kind"])}</span>'
        if r["kind"] == "golden":
            if r["live_passed"] and not r["candidate_passed"]:
                tags += '<span class="ac-tag lost">now wrong</span>'
            elif r["candidate_passed"] and not r["live_passed"]:
                tags += '<span class="ac-tag gained">now right</span>'
        if not r["changed"]:
            tags += '<span class="ac-tag">same</span>'
        body.append(f'<tr class="{"changed" if r["changed"] else "same"}" data-kind="{esc(r["kind"])}">'
                    f'<td>{tags}<br>{esc(r["prompt"])}</td><td>{_diffed(r["diff"], "live")}</td>'
                    f'<td>{_diffed(r["diff"], "candidate")}</td></tr>')
    return (f'<div class="ac-comparison"><div class="ac-sentence">{esc(head)}.</div>'
            f'<table class="ac-compare"><colgroup><col class="q"><col><col></colgroup>'
            f'<thead><tr><th>prompt</th><th>{esc(live)} (live)</th><th>v{version} (candidate)</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def version_details(a: dict) -> str:
    """Everything else recorded with a version, in one panel."""
    m, cost, cfg = a.get("metrics_json") or {}, a.get("cost_json") or {}, a.get("config_json") or {}
    items = [
        ("name", a.get("name")), ("parent", reports.version_label(a.get("parent_version"))),
        ("created", (a.get("created_utc") or "")[:19].replace("T", " ")),
        # A version trained on lone votes (KTO) lists their ids with the pairs' (pair_ids_json).
        ("pairs trained on", m["pairs"] if "votes" in m else len(a.get("pair_ids_json") or [])),
        ("held-out pairs", m.get("eval_pairs")),
        ("steps", m.get("steps")), ("training loss (first → last epoch)", f"{reports.figure(m.get('first_loss'))} → {reports.figure(m.get('loss'))}"),
        ("training time", reports.duration(a.get("train_seconds"))),
        ("trainable parameters", f"{a.get('trainable_params') or 0:,} ({(a.get('trainable_share') or 0):.1%})"),
        ("cost", f"${cost.get('estimated_usd', 0):.4f} (full fine-tuning ${cost.get('full_finetune_usd', 0):.4f})"),
        ("settings", ", ".join(f"{k} {cfg[k]}" for k in ("learning_rate", "epochs", "rank", "beta") if k in cfg)),
        ("number format", (cfg.get("format") or {}).get("dtype", cfg.get("dtype"))),
        ("method", m.get("objective") or cfg.get("method", "dpo")),  # dpo, kto, dpo+kto or sft
    ]
    if m.get("votes"):
        items.insert(4, ("votes trained on", f"{m['votes']} ({m.get('votes_up')} up, {m.get('votes_down')} down), "
                                             f"{m.get('eval_votes')} held out"))
    lineage = cfg.get("dataset_lineage")
    if lineage:  # an SFT version: what it learned from
        items.append(("data set", f"{str(lineage.get('hash'))[:12]}: {lineage.get('rows')} rows, "
                                  f"{lineage.get('heldout_rows')} held-out questions, from {lineage.get('source')}"))
    return '<div class="ac-details">' + "".join(
        f"<div><b>{esc(k)}:</b> {esc(reports.figure(v))}</div>" for k, v in items) + "</div>"


def feedback_summary(summary: dict | None) -> str:
    return '<div class="ac-summary"><ul>' + "".join(
        f"<li>{esc(s)}</li>" for s in reports.feedback_sentences(summary)) + "</ul></div>"


def dataset_report(report: dict) -> str:
    """An SFT data set's report (``tuning.dataset.DatasetReport.as_dict``): what was found,
    each error and warning, and whether it may train. Every text escaped: the file is the
    uploader's, and so are the names and lines quoted from it."""
    stats = report.get("stats") or {}
    verdict = (f"<b class='ok'>OK</b>: clean; kept as {esc(report.get('hash') or '')[:12]}. Press “Train on it”."
               if report.get("ok") else "<b class='bad'>REFUSED</b>: nothing trains on it until the errors are fixed.")
    lines = [f"<p>{esc(report.get('source', ''))}: {esc(report.get('format', ''))}, {int(report.get('rows') or 0)} training "
             f"rows, {int(report.get('heldout_rows') or 0)} held-out questions"
             + (f"; tokens per row mean {esc(stats.get('mean_tokens'))}, max {esc(stats.get('max_tokens'))} "
                f"(context {esc(stats.get('max_length'))})" if stats else "") + "</p>"]
    items = [f"<li><b>error</b> {esc(e)}</li>" for e in report.get("errors") or []]
    items += [f"<li>warning: {esc(w)}</li>" for w in report.get("warnings") or []]
    if items:
        lines.append("<ul>" + "".join(items) + "</ul>")
    lines.append(f"<p>{verdict}</p>")
    return "<div class='dataset-report'>" + "".join(lines) + "</div>"
