"""A training job's process: users' feedback (or an admin's data set) in, one gated adapter version out.

    python app.py train --as ADMIN [--set epochs=1]                  # what an admin types
    python -m tuning.train --data-dir data --as system:launcher --job J   # what the app's launcher runs
    python -m tuning.train --data-dir data --as ADMIN --pairs train.jsonl --eval-pairs heldout.jsonl \\
        --set learning_rate=1e-4 --price-per-hour 0.2
    python app.py train --sft domain.jsonl --heldout questions.jsonl --as ADMIN   # SFT on an admin's data set
    torchrun --nproc-per-node 2 app.py train --as ADMIN     # the same job on 2 processes (tuning.distributed)

The pairs and lone votes are built from the feedback in the store
(``tuning.pairs.build_preferences``), or read from ``--pairs`` and ``--eval-pairs`` (one JSON
record per line, TRL conversational form with an id: a pair ``{prompt, chosen, rejected}``
or a vote ``{prompt, completion, label}``). ``TrainConfig.objective`` ("auto") trains pairs
by DPO, lone votes by KTO, or both in one job (``tuning.kto``), and says which it was.
With ``--sft FILE`` (or ``--set method=sft --set dataset=HASH`` for a data set added before,
which is what a job queued by the console holds) the job is supervised fine-tuning on an admin's data set: the file is checked first
(``tuning.dataset``: the report is printed, and nothing is queued when it refuses), kept
under its hash in ``DATA_DIR/datasets/``, and the job reads it from there by that hash. ``--as`` names an admin account; the app's launcher names
``system:launcher``, accepted only with ``--job`` naming a queued job (``_refusal``). With
no ``--job`` the job row is queued here, refused while another job is queued or running. A
job left running by a process that died counts until it is recovered
(``loop.jobs.recover_stale_jobs``): by ``app.py train`` before it queues, by the app at its
start and before each launch.

Prints one progress line per step (loss, reward accuracy and margin; for a KTO step the KTO
loss, its reference point z0 and the up-minus-down reward; for SFT the answer tokens'
probability; seconds) and the gate's verdict at the end. Ctrl-C (or SIGTERM) cancels: the job is marked cancelled and no
adapter is kept. Exit status: 0 when a version was registered (whatever the gate said), 1
failed, 2 a setting refused, 3 refused (who, or another job active), 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from assistant.paths import DataPaths, database_option
from store.rows import utc_now


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as TrainConfig overrides (values read as JSON where they are)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, not {item!r}")
        settings[key.strip()] = _value(value.strip())
    return settings


def add_options(p: argparse.ArgumentParser) -> None:
    """The job's options, also those of ``app.py train`` (which adds ``--data-dir`` itself)."""
    p.add_argument("--as", dest="actor", required=True,
                   help="the admin account starting the job (recorded); the app's launcher names its own actor")
    p.add_argument("--job", default=None, help="run this queued job (its config_json holds setting overrides)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig setting (repeatable), e.g. --set epochs=1")
    p.add_argument("--priority", choices=["background", "normal"], default="background",
                   help="background (default): use only CPU time that serving leaves (chats stay fast)")
    p.add_argument("--model", default=None, help="base checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--models-dir", type=Path, default=None, help="prepared models (default DATA_DIR/models)")
    p.add_argument("--pairs", type=Path, default=None, help="train on these pairs (JSON lines) instead of the feedback")
    p.add_argument("--eval-pairs", type=Path, default=None, help="held-out pairs for the gate, with --pairs")
    p.add_argument("--price-per-hour", type=float, default=None, help="hardware price for the cost estimate (USD/h)")
    p.add_argument("--trainer", choices=["loop", "trl"], default=None, help="our own loop (default) or TRL's DPOTrainer")
    p.add_argument("--sft", type=Path, default=None, metavar="FILE",
                   help="supervised fine-tuning on this data set (JSONL messages or prompt/completion, or a datasets folder)")
    p.add_argument("--heldout", type=Path, default=None, metavar="FILE",
                   help="with --sft: held-out questions for the gate's domain check (paraphrases kept out of training)")
    p.add_argument("--with-edits", action="store_true",
                   help="with --sft: add users' edits (prompt + their rewrite) to the data set as SFT rows")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="the assistant's data folder (database, adapters)")
    p.add_argument("--database", default=database_option(),
                   help="a postgresql:// URL or SQLite file instead of DATA_DIR/assistant.db (default $ASSISTANT_DATABASE)")
    add_options(p)
    return p


def _overrides(store, a: argparse.Namespace, first: dict | None = None) -> dict:
    """Setting overrides: those of the queued job (``--job``) or ``first`` (``--sft``'s data
    set), then ``--set KEY=VALUE``, ``--price-per-hour`` and ``--trainer``."""
    from .config import TrainConfig

    overrides: dict = dict(first or {})
    if a.job:
        queued = store.job(a.job)
        overrides.update({k: v for k, v in (queued.get("config_json") or {}).items() if k in TrainConfig.__dataclass_fields__})
    try:
        overrides.update(parse_settings(a.set))
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if a.price_per_hour is not None:
        overrides["price_per_hour"] = a.price_per_hour
    if a.trainer:
        overrides["trainer"] = a.trainer
    if overrides.get("method") == "sft":  # SFT's own recipe, unless a setting says otherwise
        from .sft import SFT_DEFAULTS

        overrides = {**SFT_DEFAULTS, **overrides}
    return overrides


def _yield_cpu(policy: str) -> None:
    """Before torch starts its threads (they inherit it): a background job runs only on CPU
    time the chat server leaves (tuning.priority)."""
    from .priority import apply

    print(f"job priority: {policy} ({apply(policy)})", flush=True)


def read_pairs(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(a: argparse.Namespace, recover: Callable[[Any, Path], list[str]] | None = None) -> int:
    """One job: check who asks and the settings, take the job row, build or read the pairs,
    train (``tuning.trainer.train_adapter``); returns the exit status. ``recover(store,
    data_dir)`` (``app.py train`` passes ``loop.jobs.recover_stale_jobs``) fails jobs that
    died before this one is queued, once the caller is known to be allowed.

    Under torchrun with several processes (``tuning.distributed``) rank 0 is this job and
    the other ranks train beside it (``tuning.trainer.follow``)."""
    from . import distributed

    if not distributed.launched().several:
        return _lead(a, recover)
    _yield_cpu(a.priority)  # before torch starts its threads
    if not distributed.start().leader:
        from .trainer import follow

        return follow()
    try:
        return _lead(a, recover, yielded=True)
    finally:
        distributed.release()  # ranks still waiting for work: there is none
        distributed.finish()


def _lead(a: argparse.Namespace, recover: Callable[[Any, Path], list[str]] | None, yielded: bool = False) -> int:
    if (a.pairs is None) != (a.eval_pairs is None):
        print("error: --pairs and --eval-pairs go together", file=sys.stderr)
        return 2
    if a.sft is not None and a.pairs is not None:
        print("error: --sft trains on a data set, --pairs on preference pairs: choose one", file=sys.stderr)
        return 2
    if a.sft is not None and a.job:
        print("error: a queued job carries its own data set (--set dataset=HASH when it was queued)", file=sys.stderr)
        return 2
    if (a.heldout is not None or a.with_edits) and a.sft is None:
        print("error: --heldout and --with-edits go with --sft", file=sys.stderr)
        return 2
    if not yielded:
        _yield_cpu(a.priority)
    from store import JobConflict, Store

    from .config import TrainConfig

    store = Store(DataPaths(a.data_dir).database_target(getattr(a, "database", None)))
    refusal = _refusal(store, a.actor, a.job)
    if refusal:  # before torch is imported: a refusal takes a moment, not seconds
        print(f"error: {refusal}", file=sys.stderr)
        return 3
    for job_id in recover(store, a.data_dir) if recover else ():
        print(f"job {job_id}: marked failed (its process died)", flush=True)
    if a.sft is not None:  # checked and kept before anything is queued; a refused set trains nothing
        digest = add_dataset(a, a.sft, a.heldout)
        if digest is None:
            return 2
    overrides = _overrides(store, a, {"method": "sft", "dataset": digest} if a.sft is not None else {})
    try:
        config = TrainConfig().replace(**overrides)
    except ValueError as e:
        if a.job:
            store.update_job(a.job, status="failed", error=str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    job_id = a.job
    if job_id is None:  # started here: the job row first, refused while another is active
        try:
            job_id = store.queue_job(a.actor, overrides, host=socket.gethostname())
        except JobConflict as e:
            print(f"error: {e}", file=sys.stderr)
            return 3

    from .heartbeat import start_heartbeat

    # At work from here on, pairs first (minutes on a big store): an app starting meanwhile
    # must see a running job with a live process and a heartbeat, not a queued one to fail.
    store.update_job(job_id, status="running", pid=os.getpid(), host=socket.gethostname(), started_utc=utc_now(),
                     heartbeat_utc=utc_now())
    beating = start_heartbeat(store, job_id)
    try:
        result = _train_job(a, store, config, job_id, beating)
    except BaseException as e:  # a job left active would refuse every later start
        if store.job(job_id)["status"] in ("queued", "running"):
            store.update_job(job_id, status="failed", error=f"{type(e).__name__}: {e}", finished_utc=utc_now())
        raise
    finally:
        beating.set()
    if result is None:
        return 1
    if result.status == "succeeded":
        verdict = "PASSED" if result.gate.passed else "FAILED (promotion needs an admin override)"
        print(f"version {result.version} ({result.name}) registered; gate {verdict}")
        for c in result.gate.checks:
            print(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['check']}: {c['detail']}")
        return 0
    print(f"job {result.job_id} {result.status}: {result.error}", file=sys.stderr)
    return 130 if result.status == "cancelled" else 1


def add_dataset(a: argparse.Namespace, path: Path, heldout: Path | None, keep: bool = True) -> str | None:
    """Check an admin's data set file against the base model's tokenizer, print the report,
    keep it under its hash (unless ``keep`` is false: ``app.py dataset check``); the hash,
    or None when the report refuses it."""
    from assistant.model_files import resolve_model
    from transformers import AutoTokenizer

    from .config import TrainConfig
    from .dataset import read_dataset, store_dataset

    model_dir = resolve_model(a.model, a.models_dir or DataPaths(a.data_dir).models)
    max_length = TrainConfig().max_length
    for item in a.set:  # the context the job will train with
        key, _, value = item.partition("=")
        if key.strip() == "max_length" and isinstance(_value(value.strip()), int):
            max_length = _value(value.strip())
    extra = None
    if getattr(a, "with_edits", False):
        from store import Store

        from .dataset import edit_rows

        extra = edit_rows(Store(DataPaths(a.data_dir).database_target(getattr(a, "database", None))))
    report = read_dataset(path, heldout, tokenizer=AutoTokenizer.from_pretrained(model_dir), max_length=max_length,
                          extra=extra)
    print(report.text(), flush=True)
    if not report.ok:
        return None
    return store_dataset(a.data_dir, report) if keep else report.hash


def _refusal(store, actor: str, job_id: str | None) -> str | None:
    """Why ``actor`` may not run this job, or None. An admin may start or run a job. The
    app's launcher names ``store.actors.LAUNCHER``, an actor no account can hold, and only
    for a job already queued: queueing one took an admin (the console) or the schedule, so a
    person typing it gains nothing an admin did not grant."""
    from store import NotFound
    from store.actors import LAUNCHER, is_system

    if not is_system(actor):
        return None if store.is_admin(actor) else f"{actor!r} is not an admin account"
    if actor != LAUNCHER or not job_id:
        return (f"{actor!r} is one of the app's own actors; it runs only jobs the app queued (--job). "
                "Start a job as your admin account: --as NAME")
    try:
        status = store.job(job_id)["status"]
    except NotFound:
        return f"no training job {job_id!r}"
    return None if status == "queued" else f"training job {job_id} is {status}, not queued; nothing to run"


def _train_job(a, store, config, job_id: str, beating):
    """The pairs (files, or built from the store), then the job; None when the store holds
    not enough data (job failed). ``beating`` is the heartbeat that covers building pairs;
    train_adapter beats on its own."""
    from dataclasses import asdict

    from assistant.model_files import resolve_model

    from .kto import choose_objective, data_problem, objective_data
    from .pairs import build_preferences, format_summary
    from .trainer import train_adapter

    # SIGTERM (a launcher stopping us) cancels like Ctrl-C: cleanly, job marked cancelled.
    # SIGINT is set too: a process started in the background by a non-interactive shell (a
    # script's `app.py train ... &`, a CI runner) inherits SIGINT ignored, and Python then
    # leaves it ignored, so Ctrl-C or `kill -INT` did nothing and the job trained on.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lineage = None
    if config.method == "sft":
        from .dataset import dataset_report, load_dataset

        try:
            train, held = load_dataset(a.data_dir, config.dataset)
        except ValueError as e:
            store.update_job(job_id, status="failed", error=str(e), finished_utc=utc_now())
            print(f"error: {e}", file=sys.stderr)
            return None
        kept = dataset_report(a.data_dir, config.dataset) or {}
        lineage = {"hash": config.dataset, "rows": len(train), "heldout_rows": len(held),
                   "format": kept.get("format"), "source": kept.get("source")}
        print(f"supervised fine-tuning on data set {config.dataset[:12]}: {len(train)} rows, "
              f"gate on {len(held)} held-out questions; Ctrl-C cancels", flush=True)
    elif a.pairs is not None:  # pair lines ({prompt, chosen, rejected}) and vote lines ({prompt, completion, label})
        train, held = read_pairs(a.pairs), read_pairs(a.eval_pairs)
        votes, held_votes = [r for r in train if "label" in r], [r for r in held if "label" in r]
        train, held = [r for r in train if "label" not in r], [r for r in held if "label" not in r]
    else:
        data = build_preferences(store)
        print(format_summary(data.summary), flush=True)
        train, held = [asdict(p) for p in data.train_pairs], [asdict(p) for p in data.eval_pairs]
        votes, held_votes = [asdict(u) for u in data.train_unpaired], [asdict(u) for u in data.eval_unpaired]
    if lineage is None:
        # Pairs train by DPO, lone votes by KTO, both in one job (config.objective decides).
        objective = choose_objective(config.objective, train, votes)
        problem = data_problem(objective, *objective_data(objective, train, held, votes, held_votes))
        if problem:
            reason = (f"not enough preference data for {objective.upper()}: {problem} ({len(train)} training and "
                      f"{len(held)} held-out pairs, {len(votes)} training and {len(held_votes)} held-out votes)")
            store.update_job(job_id, status="failed", error=reason, finished_utc=utc_now())
            print(f"error: {reason}", file=sys.stderr)
            return None
    domain = None if lineage is not None else _learned_domain(store, a.data_dir, config)
    if lineage is None:
        what = {"dpo": f"DPO on {len(train)} pairs, gate on {len(held)} held-out pairs",
                "kto": f"KTO on {len(votes)} votes" + (f" and {len(train)} pairs as votes" if train else "")
                       + f", gate on {len(held_votes) + len(held)} held-out votes" + (" and pairs" if held else ""),
                "dpo+kto": f"DPO on {len(train)} pairs and KTO on {len(votes)} votes, gate on {len(held)} held-out "
                           f"pairs and {len(held_votes)} held-out votes"}[objective]
        print(f"training by {what}" + (f" and {len(domain)} held-out domain questions" if domain else "")
              + "; Ctrl-C cancels", flush=True)
    model_dir = resolve_model(a.model, a.models_dir or DataPaths(a.data_dir).models)
    beating.set()  # train_adapter starts its own heartbeat: one writer per job, not two
    return train_adapter(train, held, store=store, data_dir=a.data_dir, base_model_dir=model_dir, config=config,
                         job_id=job_id, created_by=a.actor, progress=print_progress, dataset=lineage, domain=domain,
                         **({} if lineage is not None else {"votes": votes, "eval_votes": held_votes}))


def _learned_domain(store, data_dir: Path, config) -> list[dict]:
    """Held-out questions of the data sets that the parent (``continue_from``) or the live
    version was trained on: a DPO version must not lose a domain an admin taught."""
    from .dataset import load_dataset

    rows: dict[str, dict] = {}
    for version in {config.continue_from, store.live_version()} - {None}:
        digest = (store.adapter(version).get("config_json") or {}).get("dataset")
        if digest:
            try:
                # ids are unique within a set, not across sets: the hash's start keeps them apart
                rows.update({f"{digest[:12]}-{r['id']}": {**r, "id": f"{digest[:12]}-{r['id']}"}
                             for r in load_dataset(data_dir, digest)[1]})
            except ValueError as e:  # a set removed or changed on disk: say so, gate without it
                print(f"warning: the domain check is skipped: {e}", flush=True)
    return list(rows.values())


def print_progress(row: dict) -> None:
    if "loss" in row and row.get("phase") == "training" and "token_prob" in row:
        print(f"step {row['step']}/{row['steps']}  epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  "
              f"answer token prob {row['token_prob']:.3f}  {row['seconds']:.0f}s", flush=True)
    elif "loss" in row and row.get("phase") == "training" and row.get("objective") == "kto":
        margin = "" if row.get("reward_margin") is None else f"  up-down reward {row['reward_margin']:+.3f}"
        print(f"step {row['step']}/{row['steps']}  epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  "
              f"KTO {row['kto_loss']:.4f}  z0 {row['kl']:.3f}{margin}  {row['seconds']:.0f}s", flush=True)
    elif "loss" in row and row.get("phase") == "training":
        print(
            f"step {row['step']}/{row['steps']}  epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  "
            f"reward acc {row['reward_accuracy']:.2f}  margin {row['reward_margin']:+.3f}  {row['seconds']:.0f}s",
            flush=True,
        )
    elif "replay_total" in row and "step" not in row and "replay_rows" not in row:
        print(f"answered {row['replay_answered']}/{row['replay_total']} general questions to replay  "
              f"{row['job_seconds']:.0f}s", flush=True)
    elif row.get("phase") not in (None, "training"):
        print(f"[{row['phase']}] {row['job_seconds']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
