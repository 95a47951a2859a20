"""What the admin console and the command line show about jobs and versions, as plain data.

Read from rows the store already keeps, so nothing is retrained or recomputed:

- :func:`job_view`: a job's phase (building pairs, training, saving, gate), its step of
  steps, elapsed and estimated time left, the curves of loss, reward accuracy and margin
  (the trainer's per-step ``progress_json.history``) and, once it ended, one sentence.
- :func:`verdict`: the gate's checks as recorded in the version's ``eval_json`` (any number
  of them, in their order), each with its value, the live version's and the threshold when
  the gate recorded them.
- :func:`comparison`: the live version's and the candidate's greedy answers to the golden
  and held-out prompts side by side (the gate generated both; ``eval_json`` keeps them),
  with a word diff (:func:`word_diff`).
- :func:`feedback_sentences`: the pair builder's summary in a few sentences.

``ui.console_html`` draws these; ``loop.commands`` prints them.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from typing import Any

from .canary import wilson

# Named steps of a job as an admin thinks of them; the trainer's own phases map onto them.
STAGES = ("building pairs", "training", "saving", "gate")
_STAGE_OF = {"loading": "training", "training": "training", "saving": "saving", "validating": "saving",
             "evaluating": "gate", "registering": "gate"}
CURVES = (("loss", "loss"), ("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"))
# Gate metrics drawn across versions, each on its own axis: (eval_json key, label, axis range or None).
GATE_METRICS = (
    ("preference_accuracy", "held-out preference accuracy", (0.0, 1.0)),
    ("reward_margin", "held-out reward margin", None),
    ("golden_share", "golden prompts answered right", (0.0, 1.0)),
    ("mean_answer_tokens", "mean answer length (tokens)", None),
)


def _time(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts) if ts else None


def duration(seconds: float | None) -> str:
    """'45 s', '6 min', '1 h 05 min'."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def version_label(v: int | None) -> str:
    return "base model" if v is None else f"v{v}"


def stage_of(job: dict) -> str:
    """The named step a job is in: queued, building pairs, training, saving, gate, or its end."""
    if job["status"] == "queued":
        return "queued"
    if job["status"] != "running":
        return job["status"]
    return _reached(job)


def _reached(job: dict) -> str:
    """The named step a job's progress reached (where a failed job stopped)."""
    phase = (job.get("progress_json") or {}).get("phase")
    # app.py train marks the job running, then builds pairs before the trainer reports a phase.
    return _STAGE_OF.get(phase, "building pairs" if phase is None else "gate")


def job_view(job: dict, adapter: dict | None = None, now: dt.datetime | None = None) -> dict:
    """Everything the console shows about one job (``adapter``: the version it produced)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    p = job.get("progress_json") or {}
    start = _time(job.get("started_utc")) or _time(job.get("created_utc"))
    end = _time(job.get("finished_utc")) or (now if job["status"] in ("queued", "running") else _time(job.get("heartbeat_utc")))
    elapsed = (end - start).total_seconds() if start and end else None
    step, steps = p.get("step"), p.get("steps")
    history = p.get("history") or []
    eta = None
    stage = stage_of(job)
    if stage in ("building pairs", "training") and step and steps:
        per_step = (p.get("seconds") or 0) / step
        eta = per_step * (steps - step) if per_step else None
    view = {
        "id": job["id"], "status": job["status"], "stage": stage, "created_by": job.get("created_by"),
        "step": step, "steps": steps, "fraction": (step / steps) if step and steps else 0.0,
        "elapsed": elapsed, "eta": eta, "history": history,
        "curves": {label: [(h["step"], h[key]) for h in history if key in h] for key, label in CURVES},
        "last": {label: p.get(key) for key, label in CURVES},
        "pairs": (job.get("config_json") or {}).get("pairs"),
        # A feedback job's objective (tuning.kto.choose_objective) and the votes KTO trained on.
        "objective": (job.get("config_json") or {}).get("objective"),
        "votes": {"n": (job.get("config_json") or {}).get("votes"), "up": (job.get("config_json") or {}).get("votes_up"),
                  "down": (job.get("config_json") or {}).get("votes_down")},
        "version": job.get("adapter_version"), "error": job.get("error"),
        "replay": {"answered": p.get("replay_answered", 0), "total": p.get("replay_total")},
        "gate_passed": None if adapter is None else bool(adapter.get("gate_passed")),
    }
    view["reached"] = reached = _reached(job) if job["status"] != "queued" else None
    view["stages"] = [{"name": s, "state": _stage_state(s, reached, job["status"])} for s in STAGES]
    view["sentence"] = job_sentence(view, adapter)
    return view


def _stage_state(name: str, reached: str | None, status: str) -> str:
    """done, now, todo, or failed (the stage a failed or cancelled job stopped in)."""
    if status == "succeeded":
        return "done"
    if reached not in STAGES:
        return "todo"
    i, j = STAGES.index(name), STAGES.index(reached)
    return "done" if i < j else "todo" if i > j else "now" if status == "running" else "failed"


def job_sentence(view: dict, adapter: dict | None = None) -> str:
    """One sentence: where the job is, or how it ended and why."""
    took = duration(view["elapsed"])
    if view["status"] == "queued":
        return "Queued: the job starts in a moment."
    if view["status"] == "running":
        if view["stage"] == "training" and view["steps"]:
            left = f", about {duration(view['eta'])} left" if view["eta"] is not None else ""
            return f"Training: step {view['step']} of {view['steps']} after {took}{left}."
        replay = view.get("replay") or {}
        if view["stage"] == "training" and replay.get("total"):  # before the first step (tuning.sft.replay_rows)
            return (f"Training: first answering the general questions the new version must keep answering "
                    f"as before ({replay['answered']} of {replay['total']}, {took} so far).")
        return f"{view['stage'].capitalize()} ({took} so far)."
    if view["status"] == "succeeded" and view["version"]:
        pairs = view["pairs"] if view["pairs"] is not None else len((adapter or {}).get("pair_ids_json") or [])
        sft = ((adapter or {}).get("config_json") or {}).get("method") == "sft"
        votes, objective = view.get("votes") or {}, view.get("objective")
        updown = f" ({votes.get('up', 0)} up, {votes.get('down', 0)} down)"
        if objective == "kto":
            head = f"v{view['version']} trained by KTO on {votes.get('n', 0)} votes{updown} in {took}"
        elif objective == "dpo+kto":
            head = (f"v{view['version']} trained by DPO on {pairs} pairs and KTO on {votes.get('n', 0)} "
                    f"votes{updown} in {took}")
        else:
            head = f"v{view['version']} trained on {pairs} {'rows of a data set' if sft else 'pairs'} in {took}"
        if adapter is None:
            return head + "."
        checks = verdict(adapter.get("eval_json") or {})
        if adapter.get("gate_passed"):
            return f"{head}; the gate passed it ({len(checks)} of {len(checks)} checks)."
        failed = [c for c in checks if not c["passed"]]
        why = "; ".join(f"{c['check']}: {c['detail']}" for c in failed) or "no check recorded"
        return f"{head}; the gate refused it because {why}" + ("" if why[-1] in ".?!" else ".")
    word = {"failed": "failed", "cancelled": "was cancelled"}.get(view["status"], view["status"])
    return (f"The job {word} after {took} while {view['reached'] or 'queued'}"
            + (f": {view['error']}" if view["error"] else "."))


def verdict(eval_json: dict) -> list[dict]:
    """The gate's checks in their recorded order: check, passed, detail, and value, live,
    threshold where the gate recorded them (None otherwise). Any set of checks."""
    return [
        {"check": str(c.get("check", "?")), "passed": bool(c.get("passed")), "detail": str(c.get("detail", "")),
         "value": c.get("value"), "live": c.get("live"), "threshold": c.get("threshold")}
        for c in eval_json.get("checks") or []
    ]


def figure(x: Any) -> str:
    """A check's value as shown: floats to 3 significant places, the rest as text."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """[(op, text)] with op 'same', 'del' (only in old) or 'ins' (only in new), word by word."""
    a, b = _WORDS.findall(old or ""), _WORDS.findall(new or "")
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    out: list[tuple[str, str]] = []
    gone, added = "", ""  # a change runs on over the spaces between changed words: one span, not many
    for k, (op, i1, i2, j1, j2) in enumerate(ops):
        same = "".join(a[i1:i2]) if op == "equal" else ""
        if op == "equal" and not ((gone or added) and same.isspace() and k + 1 < len(ops)):
            if gone:
                out.append(("del", gone))
            if added:
                out.append(("ins", added))
            gone, added = "", ""
            out.append(("same", same))
        elif op == "equal":
            gone, added = gone + same, added + same
        else:
            gone, added = gone + "".join(a[i1:i2]), added + "".join(b[j1:j2])
    if gone:
        out.append(("del", gone))
    if added:
        out.append(("ins", added))
    return out


def comparison(eval_json: dict) -> list[dict]:
    """Per prompt, the live version's and the candidate's greedy answers: golden prompts first
    (with whether each answered right), then held-out prompts. Built from what the gate stored."""
    live = eval_json.get("live") or {}
    rows = []
    live_golden = live.get("golden") or {}
    for prompt, g in (eval_json.get("golden") or {}).items():
        old = live_golden.get(prompt) or {}
        rows.append({"kind": "golden", "prompt": prompt, "live": old.get("answer"), "candidate": g.get("answer"),
                     "live_passed": old.get("passed"), "candidate_passed": g.get("passed")})
    live_answers = {a["prompt"]: a["answer"] for a in live.get("answers") or []}
    for a in eval_json.get("answers") or []:
        rows.append({"kind": "held-out", "prompt": a["prompt"], "live": live_answers.get(a["prompt"]),
                     "candidate": a["answer"], "live_passed": None, "candidate_passed": None})
    for r in rows:
        r["changed"] = (r["live"] or "").strip() != (r["candidate"] or "").strip()
        r["diff"] = word_diff(r["live"] or "", r["candidate"] or "")
    # What changed first, a golden answer lost before all: the admin reads from the top.
    lost = lambda r: r["kind"] == "golden" and r["live_passed"] and not r["candidate_passed"]  # noqa: E731
    return sorted(rows, key=lambda r: (not lost(r), not r["changed"]))


def comparison_counts(rows: list[dict]) -> dict:
    golden = [r for r in rows if r["kind"] == "golden"]
    return {
        "changed": sum(r["changed"] for r in rows), "total": len(rows),
        "golden_lost": [r["prompt"] for r in golden if r["live_passed"] and not r["candidate_passed"]],
        "golden_gained": [r["prompt"] for r in golden if r["candidate_passed"] and not r["live_passed"]],
    }


def gate_series(adapters: list[dict], side: str = "candidate") -> dict[str, list[tuple[str, float]]]:
    """Per gate metric (``GATE_METRICS`` labels), [(version label, value)] across versions:
    each version's own (``side="candidate"``) or the live version's it was gated against
    (``side="live"``, measured on the same held-out data)."""
    out: dict[str, list[tuple[str, float]]] = {label: [] for _, label, _ in GATE_METRICS}
    for a in adapters:
        ev = dict(a.get("eval_json") or {})
        if side == "live":
            ev = dict(ev.get("live") or {})
        if ev.get("golden_total"):
            ev["golden_share"] = ev.get("golden_passed", 0) / ev["golden_total"]
        for key, label, _ in GATE_METRICS:
            if isinstance(ev.get(key), int | float) and not isinstance(ev.get(key), bool):
                out[label].append((f"v{a['version']}", float(ev[key])))
    return out


def rates_with_intervals(rows: list[dict]) -> list[dict]:
    """Thumbs-up rate per version with its 95% Wilson interval and vote count."""
    out = []
    for r in rows:
        n = (r.get("up") or 0) + (r.get("down") or 0)
        if not n:
            continue
        lo, hi = wilson(r["up"], n)
        out.append({"version": version_label(r["version"]), "rate": r["up"] / n, "low": lo, "high": hi, "votes": n})
    return out


def feedback_sentences(summary: dict | None) -> list[str]:
    """The pair builder's summary (``tuning.pairs`` ``PreferenceData.summary``) in sentences."""
    if not summary or "read" not in summary:
        return ["No summary of the preference data yet."]
    read, pairs, cand = summary["read"], summary["pairs"], summary.get("candidates") or {}
    left, unp = summary.get("left_out") or {}, summary.get("unpaired") or {}
    plural = {"vote": "votes", "edit": "edits", "retry": "retries"}
    signals = ", ".join(f"{cand.get(s, 0)} from {plural[s]}" for s in ("vote", "edit", "retry"))
    by = ", ".join(f"{n} from {plural.get(s, s)}" for s, n in (pairs.get("by_signal") or {}).items() if n) or "none"
    lines = [
        f"{read['answers']} answers with feedback ({read['votes']} votes) from {read['users']} "
        f"user{'s' if read['users'] != 1 else ''}; candidate pairs: {signals}.",
        f"They became {pairs['total']} pairs ({by}): {pairs['train']} to train on, {pairs['eval']} held out for the gate.",
    ]
    dropped = {k: v for k, v in (summary.get("dropped_pairs") or {}).items() if v}
    contradictory = (summary.get("dropped_votes") or {}).get("contradictory", 0)
    if dropped or contradictory:
        why = [f"{n} {k.replace('_', ' ')}" for k, n in dropped.items()]
        if contradictory:
            why.append(f"{contradictory} contradictory votes")
        lines.append("Dropped: " + ", ".join(why) + ".")
    else:
        lines.append("Nothing was dropped.")
    opted, withdrawn = left.get("opted_out") or {}, left.get("withdrawn") or {}
    if opted.get("answers") or withdrawn.get("answers"):
        lines.append(f"Left out: {opted.get('answers', 0)} answers in conversations marked not for training, "
                     f"{withdrawn.get('answers', 0)} withdrawn answers.")
    if unp.get("total"):
        lines.append(f"{unp['total']} votes had no partner and are kept unpaired ({unp.get('up', 0)} up, {unp.get('down', 0)} down).")
    return lines
