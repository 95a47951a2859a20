"""The admin console: a tab of the chat app, shown to admins and refused to everyone else.

Feedback at a glance (votes per day, thumbs-up rate per version with its interval, the
pair builder's summary in sentences, the latest down-votes), retraining (now or on a
schedule) with the job drawn live (stages, a progress bar with time left, loss, reward
accuracy and margin curves, its end in a sentence) and cancel, the versions (a compact
table, each gate metric on its own axis, and for a chosen version the gate's verdict as
cards, its greedy answers beside the live version's with the changes marked, and its
details), promote / roll back / canary, export, the time from feedback to live, API
keys (issue, revoke), and teaching a domain: an uploaded SFT data set's report, then a job
on it (its content kept under its hash in the data folder; no path is ever taken from the page). The views come from ``loop.reports``; ``ui.charts`` and
``ui.console_html`` draw them, escaping every text. Every handler goes through
``loop.control.Controller``, which checks on the server that the caller is an admin; the
tab's visibility is only a convenience. The same actions are API endpoints (``/admin_*``)
for scripts.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from store import NotFound, UserError
from loop import reports
from loop.commands import parse_version
from loop.control import Conflict, Controller, Refused

from . import charts, console_html
from .chat_page import user_of

BASE = "base model"
# Every table names its columns from the start: an empty one showed Gradio's "1 2 3".
DOWNVOTE_COLUMNS = ["when", "user", "version", "prompt", "answer", "comment"]
VERSION_COLUMNS = ["version", "status", "gate", "pairs", "pref. accuracy", "margin", "golden right", "domain right",
                   "thumbs up", "created"]
PROMOTION_COLUMNS = ["when", "kind", "version", "share", "who", "why", "gate override"]
KEY_COLUMNS = ["id", "user", "label", "created", "by", "revoked"]


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    delta = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(ts)
    s = int(delta.total_seconds())
    return f"{s // 86400} d {s % 86400 // 3600} h ago" if s >= 86400 else f"{s // 3600} h {s % 3600 // 60} min ago" if s >= 3600 else f"{s // 60} min {s % 60} s ago"


def _version_label(v: int | None) -> str:
    return BASE if v is None else f"v{v}"


def _parse_version(label: str | None) -> int | None:
    if not label or label == BASE:
        return None
    try:
        return parse_version(str(label))
    except ValueError as e:
        raise gr.Error(str(e), print_exception=False) from None


def private_copies(paths) -> list[str]:
    """Copies of the exported files for this admin's File component only.

    The export folder is never served by path (no ``allowed_paths``): its names are the UTC
    second and fixed file names, which a non-admin found by guessing. Gradio copies what a
    handler returns into its cache under a secret-seeded hash of the content, and sends that
    address to this session alone. The copies go through a folder of our own (mode 0700)
    because Gradio takes only files under the working or temp directory, and the data folder
    may be anywhere."""
    folder = Path(tempfile.mkdtemp(prefix="assistant-export-"))
    return [str(shutil.copy2(p, folder / Path(p).name)) for p in paths or []]


class AdminPage:
    def __init__(
        self,
        controller: Controller,
        pair_summary: Callable[[], dict] | None = None,
        exporter: Callable[[], Any] | None = None,
        dataset_checker: Callable[[bytes, bytes | None, str], Any] | None = None,
    ):
        self.c = controller
        self.store = controller.store
        self.pair_summary = pair_summary
        self.exporter = exporter
        self.dataset_checker = dataset_checker  # tuning.dataset.UploadChecker

    def _admin(self, request: gr.Request | None) -> str:
        try:
            return self.c.require_admin(user_of(request) if request and request.username else None)
        except Refused as e:
            raise gr.Error(str(e), print_exception=False) from e

    def _act(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (Refused, Conflict, NotFound, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from e

    # -- reading ---------------------------------------------------------------------

    def versions_table(self) -> pd.DataFrame:
        live = self.store.live_version()
        canary = self.store.latest_promotion("canary")
        rates = {r["version"]: r for r in self.store.thumbs_up_by_version()}
        rows = []
        for v in [None] + [a["version"] for a in self.store.adapters()]:
            a = self.store.adapter(v) if v is not None else {}
            metrics, ev, cost = a.get("metrics_json") or {}, a.get("eval_json") or {}, a.get("cost_json") or {}
            r = rates.get(v, {})
            status = "live" if v == live else ("canary" if canary and canary["share"] > 0 and canary["version"] == v else "")
            rows.append({
                "version": _version_label(v),
                "status": status,
                "name": a.get("name", ""),
                "parent": _version_label(a.get("parent_version")) if v is not None else "",
                "pairs": len(a.get("pair_ids_json") or []),
                "train loss": metrics.get("loss"),
                "gate": "" if v is None else ("passed" if a.get("gate_passed") else "failed"),
                "held-out pref. acc.": ev.get("preference_accuracy"),
                "reward margin": ev.get("reward_margin"),
                "golden passed": ev.get("golden_passed"),
                "golden total": ev.get("golden_total"),
                "method": (a.get("config_json") or {}).get("method", "dpo") if v is not None else "",
                "domain passed": ev.get("domain_passed"),
                "domain total": ev.get("domain_total"),
                "trainable share": a.get("trainable_share"),
                "train s": a.get("train_seconds"),
                "cost $": cost.get("estimated_usd"),
                "full FT cost $": cost.get("full_finetune_usd"),
                "thumbs up": r.get("up", 0),
                "thumbs down": r.get("down", 0),
                "thumbs-up rate": None if r.get("rate") is None else round(r["rate"], 3),
                "created": a.get("created_utc", ""),
            })
        return pd.DataFrame(rows)

    def versions_shown(self, full: pd.DataFrame) -> pd.DataFrame:
        """The table on the page: the columns that decide, readable at 1280 px; the rest of a
        version is in its details panel."""
        def rate(row) -> str:
            n = (row["thumbs up"] or 0) + (row["thumbs down"] or 0)
            return f"{row['thumbs up'] / n:.0%} of {n}" if n else "no votes"

        def num(x) -> str:
            return "" if x is None or pd.isna(x) else f"{x:.3g}"

        rates = full.apply(rate, axis=1) if len(full) else []
        return pd.DataFrame({
            "version": full["version"], "status": full["status"], "gate": full["gate"], "pairs": full["pairs"],
            "pref. accuracy": full["held-out pref. acc."].map(num), "margin": full["reward margin"].map(num),
            "golden right": [
                "" if p is None or pd.isna(p) else f"{int(p)}/{int(t)}" for p, t in zip(full["golden passed"], full["golden total"])],
            "domain right": [  # SFT versions: the data set's held-out questions
                "" if p is None or pd.isna(p) or not t else f"{int(p)}/{int(t)}"
                for p, t in zip(full["domain passed"], full["domain total"])],
            "thumbs up": rates, "created": full["created"].map(lambda t: (t or "")[:16].replace("T", " ")),
        })

    def charts(self) -> tuple[str, str]:
        """(feedback charts, gate metric charts) as HTML."""
        days = self.store.ratings_per_day()
        votes = charts.bars("votes-per-day", "Votes per day", [d["day"][5:] for d in days],
                            {"up": [d["up"] for d in days], "down": [d["down"] for d in days]},
                            "votes", "No votes yet: thumbs up and down will show here by day.")
        rates = charts.intervals("thumbs-up-rate", "Thumbs-up rate per version (95% interval)",
                                 reports.rates_with_intervals(self.store.thumbs_up_by_version()),
                                 "share of votes up", "No votes yet on any version.")
        adapters = self.store.adapters()
        series, live = reports.gate_series(adapters), reports.gate_series(adapters, side="live")
        gate = "".join(
            charts.categories_line(f"gate-{key}", label, series[label], "", "No versions yet.", y_range=rng,
                                   reference=live[label])
            for key, label, rng in reports.GATE_METRICS
        )
        return f'<div class="ac-grid-2">{votes}{rates}</div>', f'<div class="ac-grid-2">{gate}</div>'

    def downvotes(self) -> pd.DataFrame:
        return pd.DataFrame([
            {"when": d["created_utc"][:16].replace("T", " "), "user": d["user_id"], "version": _version_label(d["version"]),
             "prompt": d["prompt"], "answer": d["answer"], "comment": d["comment"] or ""}
            for d in self.store.latest_downvotes(20)
        ], columns=DOWNVOTE_COLUMNS)

    def overview(self, request: gr.Request):
        self._admin(request)
        full = self.versions_table()
        feedback, gate = self.charts()
        choices = list(full["version"])
        summary = self.pair_summary() if self.pair_summary else None
        newest = choices[-1] if len(choices) > 1 else None
        return (
            feedback, gate, self.versions_shown(full), self.downvotes(), self._loop_text(),
            gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices[1:]),
            console_html.feedback_summary(summary), self._promotions(),
            gr.update(choices=choices[1:], value=newest),
        )

    def review(self, label: str | None, request: gr.Request):
        """The chosen version's verdict cards, its answers beside the live version's, its details."""
        self._admin(request)
        v = _parse_version(label)
        if v is None:
            none = "<p>Choose a version to see the gate's verdict and its answers beside the live version's.</p>"
            return none, "", ""
        a = self._act(self.store.adapter, v)
        ev = a.get("eval_json") or {}
        return (console_html.verdict_cards(v, ev, bool(a.get("gate_passed"))),
                console_html.comparison_table(v, ev), console_html.version_details(a))

    def _promotions(self) -> pd.DataFrame:
        rows = self.store.promotions()
        return pd.DataFrame([
            {"when": p["created_utc"][:19].replace("T", " "), "kind": p["kind"], "version": _version_label(p["version"]),
             "share": p["share"], "who": p["actor"], "why": p["reason"], "gate override": bool(p["gate_override"])}
            for p in rows
        ], columns=PROMOTION_COLUMNS)

    def _loop_text(self) -> str:
        live = self.store.live_version()
        lines = [f"**Live:** {_version_label(live)}"]
        current, verdict = self.c.canary_verdict()
        if current:
            lines.append(f"**Canary:** v{current['version']} for {current['share']:.0%} of users — {verdict.summary()}")
        if live is not None:
            a = self.store.adapter(live)
            newest = (a.get("metrics_json") or {}).get("newest_feedback_utc")
            lines.append(f"**Newest feedback in the live version:** given {_ago(newest)}")
            job = self.store.job(a["job_id"]) if a.get("job_id") else None
            promoted = next((p for p in self.store.promotions() if p["kind"] == "live" and p["version"] == live), None)
            if job and promoted:
                cycle = dt.datetime.fromisoformat(promoted["created_utc"]) - dt.datetime.fromisoformat(job["created_utc"])
                lines.append(f"**Last cycle** (retrain pressed to live): {cycle.total_seconds() / 60:.1f} min")
        cfg = self.c.config
        sched = []
        if cfg.retrain_min_new_feedback:
            sched.append(f"after {cfg.retrain_min_new_feedback} new pieces of feedback")
        if cfg.retrain_every_hours:
            sched.append(f"every {cfg.retrain_every_hours} h")
        lines.append("**Scheduled retraining:** " + (" or ".join(sched) if sched else "off"))
        lines.append(self._prepared_text(live))
        return "  \n".join(lines)

    def _prepared_text(self, live: int | None) -> str:
        """What was answered and scored ahead for the next job while the app was idle
        (``loop.jobs.Preparer.status``): what the next job will not spend minutes on."""
        head = "**Prepared ahead for the next job:** "
        if self.c.preparer is None:
            return head + "off (`--no-prepare-answers`): each job answers and scores everything itself before its first step"
        st = self.c.preparer.status()
        said = []
        if st["running"]:
            said.append(f"answering for {_version_label(st['for_version'])}, started {_ago(st['started_utc'])}"
                        + (", paused while users chat" if st["paused"] else ", at idle priority"))
        if last := st["last"]:
            n = lambda key: last[key] if isinstance(last.get(key), (int, float)) else 0  # noqa: E731
            who = last.get("live_version") if isinstance(last.get("live_version"), int) else None
            said.append(f"last done {_ago(last['finished_utc'])}: {n('replayed')} replayed answers ({n('replay_s')} s), "
                        f"{n('pairs')} pairs scored ({n('pairs_s')} s), {n('regression')} regression answers of "
                        f"{_version_label(who)} ({n('regression_s')} s), {n('held_out')} held-out pairs scored "
                        f"and their prompts answered ({n('held_out_s')} s)")
            if who != live:
                said.append(f"{_version_label(live)} went live since: the next job answers what its start needs")
            new = self.store.feedback_count_since(last["finished_utc"])
            if new:
                said.append(f"{new} votes and edits since (scored ahead from {self.c.preparer.new_feedback} on, "
                            "or by the job)")
        elif not st["running"]:
            said.append("nothing yet: the next job answers and scores everything itself before its first step")
        return head + "; ".join(said)

    def job_status(self, request: gr.Request):
        self._admin(request)
        jobs = self.store.jobs()
        if not jobs:
            return console_html.job_panel(None), gr.update(interactive=False)
        j = jobs[0]
        adapter = self.store.adapter(j["adapter_version"]) if j.get("adapter_version") else None
        return console_html.job_panel(reports.job_view(j, adapter)), gr.update(interactive=j["status"] in ("queued", "running"))

    def tick(self, seen: str | None, request: gr.Request):
        """The timer's call: the job panel, and whether a job ended since the last tick (then
        the versions, charts and review are redrawn: the new version's verdict appears by
        itself). ``seen`` is the newest ended job this page knows of (None before the first tick)."""
        html, cancel = self.job_status(request)
        jobs = self.store.jobs()
        ended = jobs[0]["id"] if jobs and jobs[0]["status"] not in ("queued", "running") else ""
        if seen is None:
            return html, cancel, ended, False
        return html, cancel, ended or seen, bool(ended) and ended != seen

    def overview_after_job(self, ended: bool, request: gr.Request):
        self._admin(request)
        return self.overview(request) if ended else gr.skip()

    def review_after_job(self, ended: bool, label: str | None, request: gr.Request):
        self._admin(request)
        return self.review(label, request) if ended else gr.skip()

    # -- actions ---------------------------------------------------------------------

    def retrain(self, settings: str, request: gr.Request):
        actor = self._admin(request)
        try:
            overrides = json.loads(settings) if settings and settings.strip() else {}
        except json.JSONDecodeError as e:
            raise gr.Error(f"The settings are not valid JSON: {e}", print_exception=False) from e
        if not isinstance(overrides, dict):
            raise gr.Error("The settings are a JSON object, e.g. {\"epochs\": 1}.", print_exception=False)
        job = self._act(self.c.retrain, actor, overrides)
        gr.Info(f"Training job {job} started.")
        return self.job_status(request)

    def check_dataset(self, train_file: str | None, heldout_file: str | None, request: gr.Request):
        """An uploaded SFT data set's report (and held-out questions); a clean one is kept
        under its hash and offered for training. Admins only, checked before any byte is read."""
        self._admin(request)
        from tuning.dataset import DatasetError, read_upload

        if self.dataset_checker is None:
            raise gr.Error("Data sets are not available in this build.", print_exception=False)
        if not train_file:
            raise gr.Error("Choose a JSONL file of training rows first.", print_exception=False)
        try:
            data = read_upload(train_file)
            held = read_upload(heldout_file) if heldout_file else None
        except DatasetError as e:
            raise gr.Error(str(e), print_exception=False) from e
        report = self.dataset_checker(data, held, Path(train_file).name)
        digest = report.hash if report.ok else None
        return console_html.dataset_report(report.as_dict()), digest, gr.update(interactive=bool(digest))

    def train_dataset(self, digest: str | None, request: gr.Request):
        """Start an SFT job on the data set last checked clean on this page."""
        actor = self._admin(request)
        if not digest:
            raise gr.Error("Check a data set first; only a clean one trains.", print_exception=False)
        job = self._act(self.c.retrain, actor, {"method": "sft", "dataset": digest})
        gr.Info(f"Training job {job} started on data set {digest[:12]}.")
        return self.job_status(request)

    def cancel(self, request: gr.Request):
        actor = self._admin(request)
        jobs = self.store.jobs()
        if not jobs:
            raise gr.Error("No job to cancel.", print_exception=False)
        self._act(self.c.cancel, actor, jobs[0]["id"])
        gr.Info("Cancel requested; the job stops after its current step.")
        return self.job_status(request)

    def promote(self, label: str, reason: str, override: bool, request: gr.Request):
        actor = self._admin(request)
        self._act(self.c.promote, actor, _parse_version(label), reason or "", override=bool(override))
        gr.Info(f"{label} is live from the next request.")
        return self.overview(request)

    def rollback(self, label: str, reason: str, request: gr.Request):
        actor = self._admin(request)
        self._act(self.c.rollback, actor, _parse_version(label), reason or "rollback")
        gr.Info(f"Rolled back to {label}.")
        return self.overview(request)

    def canary(self, label: str, share: float, request: gr.Request):
        actor = self._admin(request)
        v = _parse_version(label)
        if v is None:
            raise gr.Error("Choose an adapter version for the canary.", print_exception=False)
        self._act(self.c.start_canary, actor, v, float(share) / 100, f"canary {share}%")
        gr.Info(f"v{v} now answers {share}% of users.")
        return self.overview(request)

    def stop_canary(self, request: gr.Request):
        actor = self._admin(request)
        self._act(self.c.stop_canary, actor, "stopped by an admin")
        return self.overview(request)

    def export(self, request: gr.Request):
        self._admin(request)
        if self.exporter is None:
            raise gr.Error("Export is not available in this build.", print_exception=False)
        files = self._act(self.exporter)
        gr.Info("Exported.")
        return private_copies(files)

    # -- API keys (the OpenAI-compatible API's) ---------------------------------------

    def keys_table(self, request: gr.Request) -> pd.DataFrame:
        self._admin(request)
        return pd.DataFrame([
            {"id": k["id"], "user": k["user_id"], "label": k["label"], "created": k["created_utc"],
             "by": k["created_by"], "revoked": k["revoked_utc"] or ""}
            for k in self.store.api_keys()
        ], columns=KEY_COLUMNS)

    def issue_key(self, user: str, label: str, request: gr.Request):
        """A new key for ``user``, shown once in the page (only its hash is kept)."""
        actor = self._admin(request)
        try:
            _, key = self.store.issue_api_key((user or "").strip(), label or "", created_by=actor)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from e
        gr.Info(f"Key issued to {user}: copy it now, it is not shown again.")
        return gr.update(value=key, visible=True), self.keys_table(request)

    def revoke_key(self, key_id: str, request: gr.Request) -> pd.DataFrame:
        self._admin(request)
        self._act(self.store.revoke_api_key, (key_id or "").strip())
        gr.Info(f"Key {key_id} revoked.")
        return self.keys_table(request)

    # -- API endpoints for scripts ---------------------------------------------------

    def api_retrain(self, settings: str = "", request: gr.Request = None) -> dict:
        """Start a training job (admins only). settings: JSON object of overrides."""
        self.retrain(settings, request)
        return self.store.jobs()[0]

    def api_cancel(self, request: gr.Request = None) -> dict:
        """Cancel the running training job (admins only)."""
        self.cancel(request)
        return self.store.jobs()[0]

    def api_promote(self, version: str, reason: str = "", override: bool = False, request: gr.Request = None) -> dict:
        """Make a version ('v3' or 'base model') live (admins only)."""
        actor = self._admin(request)
        self._act(self.c.promote, actor, _parse_version(version), reason, override=override)
        return {"live": _version_label(self.store.live_version())}

    def api_rollback(self, version: str, reason: str = "", request: gr.Request = None) -> dict:
        """Roll back to an earlier version or 'base model' (admins only)."""
        actor = self._admin(request)
        self._act(self.c.rollback, actor, _parse_version(version), reason or "rollback")
        return {"live": _version_label(self.store.live_version())}

    def api_canary(self, version: str, percent: float, request: gr.Request = None) -> dict:
        """Serve a version to percent% of users, sticky per user (admins only)."""
        actor = self._admin(request)
        self._act(self.c.start_canary, actor, _parse_version(version), percent / 100, f"canary {percent}%")
        return {"canary": version, "percent": percent}

    def api_stop_canary(self, request: gr.Request = None) -> dict:
        """Stop the canary (admins only)."""
        actor = self._admin(request)
        self._act(self.c.stop_canary, actor, "stopped by an admin")
        return {"canary": None}

    def api_versions(self, request: gr.Request = None) -> list[dict]:
        """Every version with its metrics, gate results and thumbs-up rate (admins only)."""
        self._admin(request)
        return json.loads(self.versions_table().to_json(orient="records"))

    def api_compare(self, version: str, request: gr.Request = None) -> dict:
        """A version's gate verdict and its greedy answers beside the live version's (admins only)."""
        self._admin(request)
        v = _parse_version(version)
        if v is None:
            raise gr.Error("Give a trained version, e.g. v3.", print_exception=False)
        ev = self._act(self.store.adapter, v).get("eval_json") or {}
        rows = [{k: r[k] for k in ("kind", "prompt", "live", "candidate", "changed", "live_passed", "candidate_passed")}
                for r in reports.comparison(ev)]
        return {"version": f"v{v}", "live_version": _version_label(ev.get("live_version")),
                "checks": reports.verdict(ev), "answers": rows}

    def api_job(self, request: gr.Request = None) -> dict:
        """The newest training job with its progress (admins only)."""
        self._admin(request)
        jobs = self.store.jobs()
        return jobs[0] if jobs else {}

    # -- layout ----------------------------------------------------------------------

    def on_load(self, request: gr.Request):
        """Show the tab and start its progress timer for admins only."""
        admin = self.store.is_admin(request.username if request else None)
        return gr.update(visible=admin), gr.Timer(active=admin)

    def build(self) -> gr.Tab:
        with gr.Tab("Admin", visible=False, elem_id="admin-tab") as tab:
            loop_text = gr.Markdown(elem_id="loop-status")
            refresh = gr.Button("Refresh", size="sm", elem_id="admin-refresh")
            html = dict(css_template=charts.CSS, js_on_load=None, apply_default_css=True)
            with gr.Accordion("Feedback at a glance", open=True):
                feedback_charts = gr.HTML(elem_id="feedback-charts", **html)
                summary = gr.HTML(elem_id="pair-summary", **html)
                downvotes = gr.Dataframe(label="Latest down-votes", wrap=True, max_height=300, elem_id="downvotes", headers=DOWNVOTE_COLUMNS,
                                         column_widths=["13%", "8%", "7%", "25%", "30%", "17%"], max_chars=300)
            with gr.Accordion("Training", open=True):
                settings = gr.Code(label="Settings for this run (JSON overrides of the defaults)", language="json", value="{}", lines=3)
                with gr.Row():
                    retrain = gr.Button("Retrain now", variant="primary", elem_id="retrain")
                    cancel = gr.Button("Cancel job", variant="stop", interactive=False, elem_id="cancel-job")
                job = gr.HTML(elem_id="job-status", **html)
                # Ticks only for admins (switched on at page load): nobody else polls.
                self.timer = timer = gr.Timer(2.0, active=False)
            with gr.Accordion("Teach it a domain (SFT data set)", open=False):
                with gr.Row():
                    ds_train = gr.File(label="Training rows (JSONL: messages, or prompt/completion)", file_types=[".jsonl"],
                                       type="filepath", elem_id="dataset-train")
                    ds_held = gr.File(label="Held-out questions (JSONL, with 'expect' words), optional", file_types=[".jsonl"],
                                      type="filepath", elem_id="dataset-heldout")
                with gr.Row():
                    ds_check = gr.Button("Check", elem_id="dataset-check")
                    ds_train_btn = gr.Button("Train on it", variant="primary", interactive=False, elem_id="dataset-train-job")
                ds_report = gr.HTML(elem_id="dataset-report", **html)
                ds_hash = gr.State(None)
            with gr.Accordion("Versions", open=True):
                versions = gr.Dataframe(label="Adapter versions (choose one below for its verdict, answers and details)",
                                        wrap=True, elem_id="versions", headers=VERSION_COLUMNS)
                gate_charts = gr.HTML(elem_id="gate-charts", **html)
                with gr.Column(elem_id="review", variant="panel"):
                    review_v = gr.Dropdown(label="Review a version: the gate's verdict and its answers beside the live version's",
                                           elem_id="review-version")
                    verdict = gr.HTML(elem_id="verdict", **html)
                    compare = gr.HTML(elem_id="comparison", **html)
                    with gr.Accordion("Details of this version", open=False, elem_id="version-details-box"):
                        details = gr.HTML(elem_id="version-details", **html)
                with gr.Row():
                    promote_v = gr.Dropdown(label="Promote", elem_id="promote-version")
                    reason = gr.Textbox(label="Why", elem_id="promote-reason")
                    override = gr.Checkbox(label="Override a failed gate")
                    promote = gr.Button("Promote", variant="primary", elem_id="promote")
                with gr.Row():
                    rollback_v = gr.Dropdown(label="Roll back to", elem_id="rollback-version")
                    rollback = gr.Button("Roll back", elem_id="rollback")
                with gr.Row():
                    canary_v = gr.Dropdown(label="Canary version", elem_id="canary-version")
                    share = gr.Slider(1, 50, value=10, step=1, label="Share of users (%)")
                    canary = gr.Button("Start canary", elem_id="canary")
                    stop_canary = gr.Button("Stop canary", elem_id="stop-canary")
                promotions = gr.Dataframe(label="Promotions and rollbacks (who, when, why)", wrap=True, elem_id="promotions",
                                          headers=PROMOTION_COLUMNS)
            with gr.Accordion("Export", open=False):
                export = gr.Button("Export feedback and pairs", elem_id="export")
                files = gr.File(label="Exported files", file_count="multiple")

            with gr.Accordion("API keys (OpenAI-compatible API)", open=False) as keys_box:
                with gr.Row():
                    key_user = gr.Textbox(label="Account", elem_id="key-user")
                    key_label = gr.Textbox(label="What it is for", elem_id="key-label")
                    issue = gr.Button("Issue key", elem_id="issue-key")
                new_key = gr.Textbox(label="New key (shown once: copy it now)", visible=False, elem_id="new-key")
                keys = gr.Dataframe(label="Keys (only their hashes are kept)", wrap=True, elem_id="api-keys", headers=KEY_COLUMNS)
                with gr.Row():
                    revoke_id = gr.Textbox(label="Key id to revoke", elem_id="revoke-id")
                    revoke = gr.Button("Revoke", variant="stop", elem_id="revoke-key")

            outs = [feedback_charts, gate_charts, versions, downvotes, loop_text, promote_v, rollback_v, canary_v,
                    summary, promotions, review_v]
            p = dict(api_visibility="private")
            shown = [verdict, compare, details]

            def then_review(event):  # after any refresh, the chosen version's panels too
                event.then(self.review, [review_v], shown, **p)

            then_review(refresh.click(self.overview, None, outs, **p))
            then_review(tab.select(self.overview, None, outs, **p))
            review_v.input(self.review, [review_v], shown, **p)
            retrain.click(self.retrain, [settings], [job, cancel], **p)
            cancel.click(self.cancel, None, [job, cancel], **p)
            seen, ended = gr.State(None), gr.State(False)
            (timer.tick(self.tick, [seen], [job, cancel, seen, ended], **p)
             .then(self.overview_after_job, [ended], outs, **p)
             .then(self.review_after_job, [ended, review_v], shown, **p))
            then_review(promote.click(self.promote, [promote_v, reason, override], outs, **p))
            then_review(rollback.click(self.rollback, [rollback_v, reason], outs, **p))
            then_review(canary.click(self.canary, [canary_v, share], outs, **p))
            then_review(stop_canary.click(self.stop_canary, None, outs, **p))
            export.click(self.export, None, [files], **p)
            ds_check.click(self.check_dataset, [ds_train, ds_held], [ds_report, ds_hash, ds_train_btn], **p)
            ds_train_btn.click(self.train_dataset, [ds_hash], [job, cancel], **p)
            keys_box.expand(self.keys_table, None, [keys], **p)
            issue.click(self.issue_key, [key_user, key_label], [new_key, keys], **p)
            revoke.click(self.revoke_key, [revoke_id], [keys], **p)
            for name in ("retrain", "cancel", "promote", "rollback", "canary", "stop_canary", "versions", "job", "compare"):
                gr.api(getattr(self, f"api_{name}"), api_name=f"admin_{name}")
        return tab
