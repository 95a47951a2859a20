"""The admin console: a tab of the chat app, shown to admins and refused to everyone else.

Feedback at a glance, retraining (now or on a schedule) with live progress and cancel, the
table and plots of every adapter version, promote / roll back / canary, export, and the
time from feedback to live, and API keys (issue, revoke). Every handler goes through ``loop.control.Controller``,
which checks on the server that the caller is an admin; the tab's visibility is only a
convenience. The same actions are API endpoints (``/admin_*``) for scripts.
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
from loop.commands import parse_version
from loop.control import Conflict, Controller, Refused

from .chat_page import user_of

BASE = "base model"


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
    ):
        self.c = controller
        self.store = controller.store
        self.pair_summary = pair_summary
        self.exporter = exporter

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

    def overview(self, request: gr.Request):
        self._admin(request)
        days = pd.DataFrame(self.store.ratings_per_day())
        if days.empty:
            days = pd.DataFrame({"day": [], "votes": [], "kind": []})
        else:
            days = days.melt(id_vars="day", value_vars=["up", "down"], var_name="kind", value_name="votes")
        versions = self.versions_table()
        rate_plot = versions[["version", "thumbs-up rate"]].dropna()
        gate_plot = versions[versions["version"] != BASE][["version", "held-out pref. acc.", "reward margin"]]
        gate_plot = gate_plot.melt(id_vars="version", var_name="metric", value_name="value").dropna()
        down = pd.DataFrame(self.store.latest_downvotes(20))
        choices = list(versions["version"])
        summary = self.pair_summary() if self.pair_summary else {"note": "pair builder not wired"}
        return (
            days, rate_plot, gate_plot, versions, down, self._loop_text(),
            gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices[1:]),
            summary, self._promotions(),
        )

    def _promotions(self) -> pd.DataFrame:
        rows = self.store.promotions()
        return pd.DataFrame([
            {"when": p["created_utc"], "kind": p["kind"], "version": _version_label(p["version"]),
             "share": p["share"], "who": p["actor"], "why": p["reason"], "gate override": bool(p["gate_override"])}
            for p in rows
        ])

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
        return "  \n".join(lines)

    def job_status(self, request: gr.Request):
        self._admin(request)
        jobs = self.store.jobs()
        if not jobs:
            return "No training job yet.", gr.update(interactive=False)
        j = jobs[0]
        p = j.get("progress_json") or {}
        bits = [f"**Job {j['id']}** — {j['status']}" + (f" (by {j['created_by']})" if j["created_by"] else "")]
        if p:
            bits.append(", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in p.items()))
        if j.get("error"):
            bits.append(f"Error: {j['error']}")
        if j.get("adapter_version"):
            bits.append(f"Produced v{j['adapter_version']}.")
        return "  \n".join(bits), gr.update(interactive=j["status"] in ("queued", "running"))

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
        ], columns=["id", "user", "label", "created", "by", "revoked"])

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
            with gr.Accordion("Feedback at a glance", open=True):
                with gr.Row():
                    per_day = gr.BarPlot(x="day", y="votes", color="kind", title="Votes per day", height=250)
                    rate = gr.BarPlot(x="version", y="thumbs-up rate", title="Thumbs-up rate per version", y_lim=[0, 1], height=250)
                downvotes = gr.Dataframe(label="Latest down-votes", wrap=True, max_height=300)
                summary = gr.JSON(label="Preference data (pair builder summary)")
            with gr.Accordion("Training", open=True):
                settings = gr.Code(label="Settings for this run (JSON overrides of the defaults)", language="json", value="{}", lines=3)
                with gr.Row():
                    retrain = gr.Button("Retrain now", variant="primary", elem_id="retrain")
                    cancel = gr.Button("Cancel job", variant="stop", interactive=False, elem_id="cancel-job")
                job = gr.Markdown(elem_id="job-status")
                # Ticks only for admins (switched on at page load): nobody else polls.
                self.timer = timer = gr.Timer(2.0, active=False)
            with gr.Accordion("Versions", open=True):
                versions = gr.Dataframe(label="Adapter versions", wrap=True, elem_id="versions")
                gate_plot = gr.LinePlot(x="version", y="value", color="metric", title="Gate metrics across versions", height=250)
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
                promotions = gr.Dataframe(label="Promotions and rollbacks (who, when, why)", wrap=True)
            with gr.Accordion("Export", open=False):
                export = gr.Button("Export feedback and pairs", elem_id="export")
                files = gr.File(label="Exported files", file_count="multiple")

            with gr.Accordion("API keys (OpenAI-compatible API)", open=False) as keys_box:
                with gr.Row():
                    key_user = gr.Textbox(label="Account", elem_id="key-user")
                    key_label = gr.Textbox(label="What it is for", elem_id="key-label")
                    issue = gr.Button("Issue key", elem_id="issue-key")
                new_key = gr.Textbox(label="New key (shown once: copy it now)", visible=False, elem_id="new-key")
                keys = gr.Dataframe(label="Keys (only their hashes are kept)", wrap=True, elem_id="api-keys")
                with gr.Row():
                    revoke_id = gr.Textbox(label="Key id to revoke", elem_id="revoke-id")
                    revoke = gr.Button("Revoke", variant="stop", elem_id="revoke-key")

            outs = [per_day, rate, gate_plot, versions, downvotes, loop_text, promote_v, rollback_v, canary_v, summary, promotions]
            p = dict(api_visibility="private")
            refresh.click(self.overview, None, outs, **p)
            tab.select(self.overview, None, outs, **p)
            retrain.click(self.retrain, [settings], [job, cancel], **p)
            cancel.click(self.cancel, None, [job, cancel], **p)
            timer.tick(self.job_status, None, [job, cancel], **p)
            promote.click(self.promote, [promote_v, reason, override], outs, **p)
            rollback.click(self.rollback, [rollback_v, reason], outs, **p)
            canary.click(self.canary, [canary_v, share], outs, **p)
            stop_canary.click(self.stop_canary, None, outs, **p)
            export.click(self.export, None, [files], **p)
            keys_box.expand(self.keys_table, None, [keys], **p)
            issue.click(self.issue_key, [key_user, key_label], [new_key, keys], **p)
            revoke.click(self.revoke_key, [revoke_id], [keys], **p)
            for name in ("retrain", "cancel", "promote", "rollback", "canary", "stop_canary", "versions", "job"):
                gr.api(getattr(self, f"api_{name}"), api_name=f"admin_{name}")
        return tab
