"""What the command line does for admins (app.py parses the arguments and calls these).

Each command works on the data folder's database, so it needs no running server: a
promotion recorded here reaches a running server within its control loop's poll interval.
Whoever can run these can read the data folder anyway, so the acting admin is named with
``--as NAME`` (recorded with every change) rather than asked for a password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from assistant.adapters import base_model_identity, base_weight_shapes

from . import reports
from .control import Controller, Refused
from .versions import resolve_version


class _NoEngine:
    """The command line changes the record; the serving process applies it."""

    def set_live(self, adapter) -> None:
        pass

    def set_canary(self, adapter, share, key) -> None:
        pass


def controller(store: Any, data_dir: Path, model_dir: Path, max_rank: int) -> Controller:
    shapes = base_weight_shapes(model_dir)
    base = base_model_identity(model_dir)

    def adapter_of(version: int):
        return resolve_version(store, data_dir, version, base_shapes=shapes, base_model=base, max_rank=max_rank)

    def no_launch(job_id: str) -> None:
        raise RuntimeError("use the train command to run training from the command line")

    return Controller(store, _NoEngine(), adapter_of, no_launch)


def require_admin(store: Any, actor: str | None) -> str:
    """The reading commands (``jobs``, ``compare``, ``feedback``) show users' text: admins only."""
    if not actor or not store.is_admin(actor):
        raise Refused("This action needs an admin account.")
    return actor


def _table(header: list[str], rows: list[list]) -> str:
    """Aligned columns for a terminal (tabs drifted once a name was longer than 8)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def versions_table(store: Any) -> str:
    live = store.live_version()
    canary = store.latest_promotion("canary")
    rates = {r["version"]: r for r in reports.rates_with_intervals(store.thumbs_up_by_version())}
    rows = []
    for v in [None] + [a["version"] for a in store.adapters()]:
        a = store.adapter(v) if v is not None else {}
        ev = a.get("eval_json") or {}
        status = "live" if v == live else "canary" if canary and canary["share"] > 0 and canary["version"] == v else "-"
        r = rates.get(reports.version_label(v))
        rate = f"{r['rate']:.2f} [{r['low']:.2f}-{r['high']:.2f}] of {r['votes']}" if r else "-"
        gate = "-" if v is None else ("passed" if a.get("gate_passed") else "failed")
        golden = f"{ev['golden_passed']}/{ev['golden_total']}" if ev.get("golden_total") else "-"
        domain = f"{ev['domain_passed']}/{ev['domain_total']}" if ev.get("domain_total") else "-"  # SFT data sets
        method = "-" if v is None else ((a.get("metrics_json") or {}).get("objective")  # dpo, kto, dpo+kto
                                        or (a.get("config_json") or {}).get("method", "dpo"))
        rows.append(["base" if v is None else f"v{v}", status, gate, method, len(a.get("pair_ids_json") or []),
                     reports.figure(ev.get("preference_accuracy")), reports.figure(ev.get("reward_margin")),
                     golden, domain, rate, a.get("name", "-")])
    return _table(["version", "status", "gate", "method", "pairs/rows", "pref_acc", "margin", "golden", "domain",
                   "thumbs_up [95%]", "name"], rows)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A curve in one line of block characters (at most ``width``, evenly sampled)."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(values), max(values)
    return "".join(SPARKS[0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARKS) - 1))] for v in values)


def job_text(view: dict) -> str:
    """One job as the console draws it: stages, a bar, the curves as sparklines, the sentence."""
    stages = "  ".join(f"[{'x' if s['state'] == 'done' else '>' if s['state'] == 'now' else ' '}] {s['name']}"
                       for s in view["stages"])
    fraction = 1.0 if view["status"] == "succeeded" else view["fraction"]
    bar = "#" * round(30 * fraction) + "." * (30 - round(30 * fraction))
    where = f"step {view['step']} of {view['steps']}" if view["steps"] else view["stage"]
    left = f" · about {reports.duration(view['eta'])} left" if view["eta"] is not None else ""
    lines = [f"job {view['id']} · {view['status']}" + (f" · started by {view['created_by']}" if view["created_by"] else ""),
             stages, f"[{bar}] {where} · {reports.duration(view['elapsed'])} elapsed{left}"]
    for name, pts in view["curves"].items():
        if pts:
            vals = [v for _, v in pts]
            lines.append(f"{name:<16} {sparkline(vals)}  {vals[0]:.3g} -> {vals[-1]:.3g}")
    lines.append(view["sentence"])
    return "\n".join(lines)


def jobs_text(store: Any, limit: int = 10) -> str:
    """The newest job drawn in full, then a line per earlier job."""
    jobs = store.jobs()[:limit]
    if not jobs:
        return "No training job yet."

    def view(j):
        a = store.adapter(j["adapter_version"]) if j.get("adapter_version") else None
        return reports.job_view(j, a)

    out = [job_text(view(jobs[0]))]
    if len(jobs) > 1:
        out.append("\nearlier jobs:")
        for j in jobs[1:]:
            out.append(f"  {j['id']}  {(j.get('created_utc') or '')[:16].replace('T', ' ')}  {view(j)['sentence']}")
    return "\n".join(out)


def compare_text(store: Any, version: int, changed_only: bool = False) -> str:
    """The gate's verdict and the version's greedy answers beside the live version's."""
    a = store.adapter(version)
    ev = a.get("eval_json") or {}
    live = reports.version_label(ev.get("live_version"))
    checks = reports.verdict(ev)
    verdict = "passed" if a.get("gate_passed") else "refused"
    out = [f"v{version} against {live} (live when it was trained): the gate {verdict} it"]
    out.append(_table(["", "check", f"v{version}", live, "needs"], [
        ["ok" if c["passed"] else "FAILED", c["check"], reports.figure(c["value"]), reports.figure(c["live"]),
         reports.figure(c["threshold"])] for c in checks]))
    out += [f"  {c['check']}: {c['detail']}" for c in checks if not c["passed"]]
    rows = reports.comparison(ev)
    counts = reports.comparison_counts(rows)
    out.append(f"\nanswers (greedy), {counts['changed']} of {counts['total']} changed; "
               "in the diff [-removed-] {+added+}:")
    for r in rows:
        if changed_only and not r["changed"]:
            continue
        mark = "changed" if r["changed"] else "same"
        if r["kind"] == "golden" and r["live_passed"] != r["candidate_passed"]:
            mark += ", now wrong" if r["live_passed"] else ", now right"
        out.append(f"\n[{r['kind']}] {r['prompt']}  ({mark})")
        out.append(f"  {live}: {r['live'] or ''}")
        out.append(f"  v{version}: {r['candidate'] or ''}")
        if r["changed"]:
            out.append("  diff: " + "".join(t if op == "same" else f"[-{t}-]" if op == "del" else f"{{+{t}+}}"
                                           for op, t in r["diff"]))
    return "\n".join(out)


def feedback_text(store: Any) -> str:
    """Votes per day (up and down as bars) and thumbs-up rate per version with its interval."""
    days = store.ratings_per_day()
    out = ["votes per day (+ up, - down):"]
    if not days:
        out.append("  no votes yet")
    top = max((d["up"] + d["down"] for d in days), default=1)
    scale = min(1.0, 50 / top)
    out += [f"  {d['day']}  {'+' * round(d['up'] * scale)}{'-' * round(d['down'] * scale)}  {d['up']} up, {d['down']} down"
            for d in days]
    rates = reports.rates_with_intervals(store.thumbs_up_by_version())
    out.append("\nthumbs-up rate per version [95% interval]:")
    out += [f"  {r['version']:<10} {r['rate']:.0%} [{r['low']:.0%}-{r['high']:.0%}] of {r['votes']} votes" for r in rates] or ["  no votes yet"]
    return "\n".join(out)


def parse_version(text: str) -> int | None:
    """'base' or 'v3' or '3'; anything else (a path, a name) is refused, never looked up."""
    text = text.strip().lower()
    if text in ("base", "none", "0"):
        return None
    if not re.fullmatch(r"v?[0-9]+", text):
        raise ValueError(f"{text!r} is not a version: give v3, 3 or base (versions are numbers, never paths).")
    return int(text.lstrip("v"))
