"""One training job, start to finish: pairs in, a validated, gated, registered version out.

``train_adapter`` runs the whole job and records it in the store as it goes (status,
heartbeat, pid, and in ``progress_json`` the last step's figures, when each phase began
and a bounded history of steps for the console's curves). The adapter is written to a hidden temporary
folder beside ``<data_dir>/adapters/``, validated, evaluated by the gate, and only then
moved into place with one atomic rename and registered. A run that fails or is cancelled
(``cancel`` event, the job's ``cancel_requested`` flag, Ctrl-C) removes its temporary
folder, marks the job with the reason and changes nothing users see. A process killed
outright (SIGKILL) cannot clean up: ``loop.jobs.recover_stale_jobs`` does it (the app, at
start and when its job process ends; ``app.py train``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from assistant.adapters import AdapterInfo, adapter_name, base_model_identity, base_weight_shapes, validate_adapter
from assistant.paths import DataPaths
from store.rows import utc_now

from . import distributed
from .config import TrainConfig, epochs_for
from .cost import estimate_cost, trainable_params
from .dpo import Cancelled, train_loop
from .gate import (GateConfig, GateResult, decide, decide_kto, decide_sft, domain_kept, measure, measure_kto,
                   measure_sft, measure_votes, pair_logratios, users_agree, vote_checks, vote_logratios)
from .kto import choose_objective, data_problem, objective_data, train_kto, vote_counts

TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"v\d+-[0-9a-f]{12}")


@dataclass
class TrainResult:
    job_id: str
    status: str  # succeeded, failed, cancelled
    version: int | None = None
    name: str | None = None
    gate: GateResult | None = None
    error: str | None = None


def load_for_training(base_model_dir: Path, config: TrainConfig, store: Any, data_dir: Path):
    """(peft model with a trainable adapter named 'default', tokenizer)."""
    return build_model(base_model_dir, config, parent_folder(base_model_dir, config, store, data_dir))


def parent_folder(base_model_dir: Path, config: TrainConfig, store: Any, data_dir: Path) -> Path | None:
    """The validated folder of the version ``config.continue_from`` names, or None."""
    if config.continue_from is None:
        return None
    parent = store.adapter(config.continue_from)
    folder = DataPaths(data_dir).version_folder(parent)  # never outside <data_dir>/adapters/
    validate_adapter(folder, base_shapes=base_weight_shapes(base_model_dir), max_rank=config.max_rank,
                     expected_hash=parent["content_hash"])
    return folder


def build_model(base_model_dir: Path, config: TrainConfig, parent: Path | None = None):
    """(peft model with a trainable adapter named 'default', tokenizer): a new adapter, or
    the one in ``parent`` (a validated version folder) to train further; no store needed."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    # fp32 master weights; with dtype bfloat16 the steps run under bf16 autocast.
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the adapter's initial A matrices
    if parent is not None:
        model = PeftModel.from_pretrained(base, parent, is_trainable=True)
    else:
        layers = base.config.num_hidden_layers
        top = range(max(0, layers - config.lora_layers), layers) if config.lora_layers else None
        targets = config.target_modules
        if top is not None and targets == "all-linear":  # peft takes layers_to_transform with names only
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                              if isinstance(m, torch.nn.Linear) and ".layers." in n})
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=targets, task_type="CAUSAL_LM",
                          layers_to_transform=list(top) if top is not None else None,
                          layers_pattern="layers" if top is not None else None)
        model = get_peft_model(base, lora)
    # Under torchrun on GPUs (NCCL) each rank trains on its own GPU; otherwise the CPU.
    return model.to(distributed.device()), tokenizer


def train_adapter(
    pairs: list[dict],
    eval_pairs: list[dict],
    *,
    store: Any,
    data_dir: Path,
    base_model_dir: Path,
    config: TrainConfig = TrainConfig(),
    gate_config: GateConfig = GateConfig(),
    job_id: str | None = None,
    created_by: str = "cli",
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    dataset: dict | None = None,
    domain: list[dict] | None = None,
    votes: list[dict] = (),
    eval_votes: list[dict] = (),
) -> TrainResult:
    """Train, validate, gate and register one adapter version; never raises for a failed run.

    ``pairs`` and ``eval_pairs`` are preference pairs (TRL conversational form with an
    ``id``); eval pairs must be held out from training. With ``config.method == "sft"``
    they are a data set's training rows and held-out rows (``{"id", "messages",
    "expect"?}``, tuning.dataset), and ``dataset`` is its lineage (hash, rows, source),
    recorded on the job and the version. ``domain``: for a DPO version, held-out questions
    of data sets its parent or the live version learned; the gate adds "domain kept".
    ``votes`` and ``eval_votes``: lone up/down votes (``{prompt, completion, label, id}``);
    ``config.objective`` and the data choose DPO, KTO or both (``tuning.kto.choose_objective``),
    the objective and the counts are recorded on the job and the version, and a KTO-only
    version gets the KTO gate (``tuning.gate.decide_kto``). ``progress`` receives a dict
    after every step and at each phase change; ``cancel`` stops the run between steps.
    """
    from assistant.precision import machine_format

    data_dir, base_model_dir = Path(data_dir), Path(base_model_dir)
    config.check()
    # "auto" becomes this machine's format here, so the job and the version record the one
    # that ran (and why), not the setting.
    fmt = machine_format(config.dtype)
    config = config.replace(dtype=fmt.dtype)
    sft = config.method == "sft"
    objective = "sft" if sft else choose_objective(config.objective, pairs, votes)
    if sft:
        votes, eval_votes = [], []
    ids = [p.get("id") for p in pairs] + ([] if objective in ("dpo", "sft") else [v.get("id") for v in votes])
    if not sft:  # DPO leaves lone votes out; KTO on everything makes each pair an up and a down vote
        pairs, eval_pairs, votes, eval_votes = objective_data(objective, pairs, eval_pairs, votes, eval_votes)
    # "auto" epochs become a number here too (tuning.config.epochs_for), recorded as run.
    config = config.replace(epochs=epochs_for(config, len(pairs) + len(votes)))
    counts = {} if sft else {"objective": objective, "votes": len(votes), "eval_votes": len(eval_votes),
                             "votes_up": vote_counts(votes)["up"], "votes_down": vote_counts(votes)["down"]}
    world = distributed.current()
    job_config = {"train": config.to_dict(), "gate": gate_config.to_dict(), "format": fmt.as_dict(),
                  "pairs": len(pairs), "eval_pairs": len(eval_pairs), **counts,
                  **({"processes": world.size} if world.several else {}),
                  **({"dataset": dataset} if dataset else {})}
    if job_id is None:
        job_id = store.queue_job(created_by, job_config, host=socket.gethostname())  # JobConflict while one is active
    else:  # a job queued elsewhere (admin page): keep what it recorded (overrides, trigger)
        job_config = {**(store.job(job_id).get("config_json") or {}), **job_config}
    started = time.monotonic()
    store.update_job(job_id, status="running", started_utc=utc_now(), heartbeat_utc=utc_now(), pid=os.getpid(),
                     host=socket.gethostname(), config_json=job_config, error=None)
    # phases: [[name, job seconds when it began], ...] (a list: the store sorts a dict's keys)
    last: dict = {"history": [], "phases": []}

    def report(row: dict) -> None:
        seconds = round(time.monotonic() - started, 1)
        if row.get("phase") and row["phase"] != last.get("phase"):
            last["phases"] = last["phases"] + [[row["phase"], seconds]]
        if "step" in row and "loss" in row:
            last["history"] = record_step(last["history"], row)
        last.update(row)
        last["job_seconds"] = seconds
        store.update_job(job_id, progress_json=last, heartbeat_utc=utc_now())
        if progress is not None:
            progress(dict(last))

    from .heartbeat import start_heartbeat

    beating = start_heartbeat(store, job_id)  # also in phases without steps (loading, the gate)

    def should_stop() -> bool:
        return bool((cancel is not None and cancel.is_set()) or store.job(job_id).get("cancel_requested"))

    root = DataPaths(data_dir).adapters
    root.mkdir(parents=True, exist_ok=True)
    # Same file system as the final folder, so the move into place is one atomic rename;
    # the dot keeps it out of any listing of versions.
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{job_id}-", dir=root))
    try:
        overlap = ({p.get("id") for p in pairs} & {p.get("id") for p in eval_pairs}) | (
            {v.get("id") for v in votes} & {v.get("id") for v in eval_votes})
        if sft and not pairs:  # an SFT set without held-out questions: the gate says so
            raise ValueError("there are no training rows")
        problem = None if sft else data_problem(objective, pairs, eval_pairs, votes, eval_votes)
        if problem:
            raise ValueError(problem)
        if overlap - {None}:
            raise ValueError(f"{len(overlap)} evaluation pair(s) or vote(s) are also training ones; "
                             "the gate needs held-out data")
        if objective not in ("dpo", "sft") and config.trainer == "trl":
            raise ValueError("trainer 'trl' runs DPO only; these votes train by KTO in our own loop "
                             "(set trainer=loop, or objective=dpo to train on the pairs alone)")
        if world.several and objective == "dpo" and config.trainer == "trl":
            raise ValueError("trainer 'trl' runs in one process; several processes train with our own loop "
                             "(trainer=loop)")
        report({"phase": "loading", "format": fmt.dtype})
        print(f"training in {fmt.describe()}" + (f" on {world.size} processes" if world.several else ""), flush=True)
        parent = parent_folder(base_model_dir, config, store, data_dir)
        distributed.send({"objective": objective, "pairs": list(pairs), "votes": list(votes), "config": config.to_dict(),
                          "base_model_dir": str(base_model_dir), "parent": str(parent) if parent else None})
        model, tokenizer = build_model(base_model_dir, config, parent)
        trainable, total, share = trainable_params(model)

        report({"phase": "training"})
        t0 = time.monotonic()
        metrics = train_model(model, tokenizer, objective, pairs, votes, config, report, should_stop,
                              replay_cache=replay_cache(base_model_dir, parent),
                              reference_cache=reference_cache(data_dir, base_model_dir, parent))
        train_seconds = time.monotonic() - t0

        report({"phase": "saving"})
        model.save_pretrained(tmp, selected_adapters=["default"])
        report({"phase": "validating"})
        base_shapes = base_weight_shapes(base_model_dir)
        info = validate_adapter(tmp, base_shapes=base_shapes, max_rank=config.max_rank)

        report({"phase": "evaluating"})
        # Evaluate in float32, without autocast: greedy answers in bfloat16 depend on how
        # many prompts share a batch (6 of 65 regression answers changed between one at a
        # time and batched, on a trained adapter), in float32 they do not, and float32 is
        # what vLLM serves on CPUs without native bf16 (token for token the same answers,
        # tests/integration/test_loop.py). A server in bfloat16 may differ at near-ties.
        import torch

        model.to("cpu", torch.float32)  # the gate runs on the CPU, also after GPU training
        if should_stop():
            raise Cancelled("cancelled before evaluation")
        if sft:
            evaluation, gate = _evaluate_sft(model, tokenizer, eval_pairs, store, data_dir, base_shapes, config,
                                             gate_config, base_model_dir)
        elif not eval_pairs:  # KTO, or both with only votes held out: the KTO gate
            evaluation, gate = _evaluate_kto(model, tokenizer, eval_votes, store, data_dir, base_shapes, config,
                                             gate_config, base_model_dir)
        else:
            evaluation, gate = _evaluate(model, tokenizer, eval_pairs, store, data_dir, base_shapes, config, gate_config,
                                         base_model_dir)
            if eval_votes:
                evaluation, gate = _votes_separated(model, tokenizer, eval_votes, store, data_dir, base_shapes, config,
                                                    gate_config, evaluation, gate, base_model_dir)
            evaluation, gate = _with_checks(evaluation, gate, [users_agree(list(pairs) + list(eval_pairs))])
        if domain and not sft:
            evaluation, gate = _domain_kept(model, tokenizer, domain, store, data_dir, base_shapes, config, gate_config,
                                            evaluation, gate, base_model_dir)
        if should_stop():
            raise Cancelled("cancelled before registration")

        report({"phase": "registering"})
        newest = max((p.get("created_utc") or "" for p in list(pairs) + list(votes)), default="") or None
        version, name = register_version(store, data_dir, tmp, info, base_model_dir, {
            "parent_version": config.continue_from,
            "job_id": job_id,
            "pair_ids_json": ids,
            "config_json": {**config.to_dict(), "gate": gate_config.to_dict(), "format": fmt.as_dict(),
                            **({"dataset_lineage": dataset} if dataset else {})},
            "metrics_json": {**metrics, "pairs": len(pairs), "eval_pairs": len(eval_pairs), **counts,
                             "newest_feedback_utc": newest, "job_seconds": round(time.monotonic() - started, 1)},
            "eval_json": evaluation,
            "gate_passed": int(gate.passed),
            "trainable_params": trainable,
            "trainable_share": round(share, 6),
            "train_seconds": round(train_seconds, 1),
            "cost_json": estimate_cost(train_seconds, config.price_per_hour, total, trainable),
        })
        report({"phase": "done", "version": version, "gate_passed": gate.passed})
        store.update_job(job_id, status="succeeded", adapter_version=version, finished_utc=utc_now())
        return TrainResult(job_id, "succeeded", version, name, gate)
    except (Cancelled, KeyboardInterrupt) as e:
        reason = str(e) or "interrupted (Ctrl-C)"
        store.update_job(job_id, status="cancelled", error=reason, finished_utc=utc_now())
        return TrainResult(job_id, "cancelled", error=reason)
    except Exception as e:  # any failure ends the job with its reason; nothing is kept
        # Remove the half-written folder first: on a full disk that frees the space the
        # job's status update needs.
        shutil.rmtree(tmp, ignore_errors=True)
        reason = failure_reason(e, last.get("phase"))
        store.update_job(job_id, status="failed", error=reason, finished_utc=utc_now())
        return TrainResult(job_id, "failed", error=reason)
    finally:
        beating.set()
        shutil.rmtree(tmp, ignore_errors=True)


def answer_cache(base_model_dir: Path, version_hash: str | None):
    """Where the gate keeps the greedy answers of the base (``version_hash`` None) or of the
    registered version with that content hash, beside the prepared base models."""
    from .generation import AnswerCache
    from .sft import starting_point

    return AnswerCache(Path(base_model_dir).resolve().parent / ".answers",
                       {"base": starting_point(base_model_dir), "version": version_hash})


@dataclass(frozen=True)
class Kept:
    """What is kept of a version that does not change between jobs (the live one, or the
    base while no version is live) for the next gate: ``regression`` its answers to the
    regression set (beside the models, ``answer_cache``); ``held_out`` its answers to the
    held-out prompts and ``scores`` its log-probabilities of the held-out pairs' answers,
    both in the data folder (``DataPaths.held_out``), each holding the last gate's or
    preparation's held-out pairs only. ``tuning.prepare`` fills them while the app is idle."""

    regression: Any
    held_out: Any
    scores: Any


def kept(base_model_dir: Path, data_dir: Path, version_hash: str | None) -> Kept:
    """What is kept of the base (``version_hash`` None) or of the version with that content hash."""
    from .dpo import ReferenceCache
    from .generation import AnswerCache
    from .sft import starting_point

    model = {"base": starting_point(base_model_dir), "version": version_hash}
    folder = DataPaths(data_dir).held_out
    return Kept(answer_cache(base_model_dir, version_hash), AnswerCache(folder, model, only_asked=True),
                ReferenceCache(folder, model))


def base_logratios(model, tokenizer, eval_pairs: list[dict], data_dir: Path, base_model_dir: Path, config,
                   gate_config) -> tuple[Kept, list[float]]:
    """What is kept of the base, and its log-ratios of the held-out pairs (read where kept):
    every DPO gate's reference point (``tuning.gate.measure``)."""
    base = kept(base_model_dir, data_dir, None)
    return base, pair_logratios(model, tokenizer, eval_pairs, adapter_off=True, batch_size=gate_config.batch_size,
                                max_length=config.max_length, cache=base.scores)[0]


def measure_fixed(model, tokenizer, eval_pairs: list[dict], base: Kept, base_lr: list[float], adapter_off: bool,
                  fixed: Kept, data_dir: Path, config, gate_config) -> dict:
    """``tuning.gate.measure`` of a version that does not change between jobs (the live one,
    active, or the base: ``adapter_off``), reading and keeping what is kept of it (``fixed``),
    then removing what is kept for versions and pairs no longer asked (``tidy``). The gate
    and ``tuning.prepare`` both call this, so what is prepared is what the gate reads."""
    out = measure(model, tokenizer, eval_pairs, base_lr, adapter_off=adapter_off, beta=config.beta, config=gate_config,
                  max_length=config.max_length, cache=fixed.regression, held_cache=fixed.held_out, scores=fixed.scores)
    tidy(data_dir, {base.scores.file("float32"), fixed.scores.file("float32"),
                    fixed.held_out.file(out["answer_reach"], gate_config.frequency_penalty)})
    return out


def tidy(data_dir: Path, used: set[Path]) -> None:
    """Remove the held-out answers and scores kept for other versions or other pairs' reach
    than ``used``: a version no longer live is not asked again, and users' prompts are not
    kept longer than a gate needs them."""
    folder = DataPaths(data_dir).held_out
    try:
        for f in folder.iterdir() if folder.is_dir() else ():
            if f.is_file() and f not in used:
                f.unlink(missing_ok=True)
    except OSError as e:  # a folder that cannot be changed only keeps what it holds; the gate's verdict stands
        print(f"kept held-out answers not tidied ({e}); they are removed by the next job or preparation", flush=True)


def replay_cache(base_model_dir: Path, parent: Path | None):
    """Where jobs starting from this base (and parent version) keep their replayed answers:
    ``tuning.sft.ReplayCache``, beside the prepared base models."""
    from .sft import ReplayCache, starting_point

    return ReplayCache(Path(base_model_dir).resolve().parent / ".replay", starting_point(base_model_dir, parent))


def reference_cache(data_dir: Path, base_model_dir: Path, parent: Path | None):
    """Where jobs starting from this base (and parent version) keep the pairs' reference:
    ``tuning.dpo.ReferenceCache``, in the data folder."""
    from .dpo import ReferenceCache
    from .sft import starting_point

    return ReferenceCache(DataPaths(data_dir).references, starting_point(base_model_dir, parent))


def train_model(model, tokenizer, objective: str, pairs: list, votes: list, config: TrainConfig,
                progress: Callable[[dict], None] | None = None,
                should_stop: Callable[[], bool] | None = None, replay_cache=None, reference_cache=None) -> dict:
    """Train the model's adapter by ``objective`` (sft, dpo, kto, dpo+kto) with the trainer
    ``config`` names; the run's metrics. The same call on every rank of a process group.
    ``replay_cache``: where the replayed answers of this start are kept (``replay_cache``);
    ``reference_cache``: where the pairs' reference of this start is (``reference_cache``)."""
    if objective == "sft":
        from .sft import train_sft

        return train_sft(model, tokenizer, pairs, config, progress, should_stop, replay_cache)
    if config.trainer == "trl" and objective == "dpo":
        from .trl_trainer import train_trl

        return train_trl(model, tokenizer, pairs, config, progress, should_stop)
    from .sft import replay_for

    # The starting model's answers to general questions, held by KL beside the feedback
    # (TrainConfig.replay): the version learns the users' style and keeps its facts.
    replay = replay_for(model, tokenizer, config, progress, replay_cache)
    if objective != "dpo":
        metrics = train_kto(model, tokenizer, pairs, votes, config, progress, should_stop, replay=replay,
                            reference_cache=reference_cache)
    else:
        metrics = train_loop(model, tokenizer, pairs, config, progress, should_stop, replay=replay,
                             reference_cache=reference_cache)
    return {**metrics, "replay_rows": len(replay.items) if replay is not None else 0}


def follow() -> int:
    """A rank other than the leader (``tuning.distributed``): wait for the leader's work,
    load the same model, train in step with it, and end; the leader saves, gates and
    registers. Exit status: 0 trained or nothing to train, 130 cancelled (by the leader)."""
    world = distributed.start()
    try:
        work = distributed.receive()
        if work is None:
            return 0
        config = TrainConfig().replace(**work["config"])
        parent = Path(work["parent"]) if work["parent"] else None
        model, tokenizer = build_model(Path(work["base_model_dir"]), config, parent)
        print(f"rank {world.rank}/{world.size}: training {len(work['pairs'])} pairs, {len(work['votes'])} votes",
              flush=True)
        try:
            train_model(model, tokenizer, work["objective"], work["pairs"], work["votes"], config,
                        replay_cache=replay_cache(Path(work["base_model_dir"]), parent))
        except Cancelled:
            return 130
        return 0
    finally:
        distributed.finish()


HISTORY_POINTS = 400  # enough for a smooth curve; the row stays a few tens of kB whatever the run's length
CURVE_KEYS = ("step", "loss", "reward_accuracy", "reward_margin", "seconds")


def record_step(history: list[dict], row: dict, limit: int = HISTORY_POINTS) -> list[dict]:
    """``history`` with one more step (its curve values only), the console's training
    curves. Past ``limit`` points every other older point goes (the last is always kept),
    so a long run keeps its whole shape at a coarser grain."""
    # A KTO step on votes of one label has no reward margin (None): no point, not a gap.
    history = history + [{k: round(row[k], 5) if isinstance(row[k], float) else row[k]
                          for k in CURVE_KEYS if row.get(k) is not None}]
    if len(history) > limit:
        history = history[:-1][::2] + history[-1:]
    return history


def register_version(store: Any, data_dir: Path, folder: Path, info: AdapterInfo, base_model_dir: Path,
                     fields: dict) -> tuple[int, str]:
    """Move a validated adapter folder into ``<data_dir>/adapters/`` under its version name
    and record it; returns (version, name). ``folder`` must be on the same file system (one
    atomic rename) and already validated (``info``); ``fields`` are the other ``adapters``
    columns (job, metrics, gate...). If the insert fails the moved folder is removed."""
    data_dir = Path(data_dir)
    version = store.next_adapter_version()
    name = adapter_name(version, info.content_hash)
    final = DataPaths(data_dir).adapters / name
    os.replace(folder, final)
    try:
        store.add_adapter({
            **fields,
            "version": version,
            "name": name,
            "content_hash": info.content_hash,
            "base_model": base_model_identity(base_model_dir),
            "path": str(final.relative_to(data_dir)),
        })
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return version, name


def failure_reason(error: Exception, phase: str | None) -> str:
    """What the job's error column says; a full disk is named as such."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" ({error.filename})" if error.filename else ""
        return (f"the disk is full: no space left on the device{where} while {phase or 'starting'}; "
                "the partial adapter was removed and nothing was registered. Free some space and retrain.")
    return f"{type(error).__name__}: {error}"


def _evaluate(model, tokenizer, eval_pairs, store, data_dir, base_shapes, config, gate_config, base_model_dir):
    """Gate metrics of the new adapter ('default') and the live version, side by side."""
    t0 = time.monotonic()
    base, base_lr = base_logratios(model, tokenizer, eval_pairs, data_dir, base_model_dir, config, gate_config)
    base_s = round(time.monotonic() - t0, 1)
    live_version, candidate, live = _live_and_candidate(
        model, store, data_dir, base_shapes, config,
        lambda adapter_off, fixed: measure_fixed(model, tokenizer, eval_pairs, base, base_lr, adapter_off, fixed,
                                                 data_dir, config, gate_config) if fixed else
        measure(model, tokenizer, eval_pairs, base_lr, adapter_off=adapter_off, beta=config.beta, config=gate_config,
                max_length=config.max_length), base_model_dir)
    gate = decide(candidate, live, gate_config)
    evaluation = _evaluation(candidate, live_version, live, gate)
    # where the gate's time went: the base's log-ratios, then each version's log-ratios and answers
    evaluation["seconds"] = {"base log-ratios": base_s, "candidate": candidate.get("seconds"), "live": live.get("seconds")}
    return evaluation, gate


def _evaluate_kto(model, tokenizer, eval_votes, store, data_dir, base_shapes, config, gate_config, base_model_dir):
    """``_evaluate`` for a KTO version: held-out votes, the regression set, fluency and length
    (tuning.gate.decide_kto), the new adapter against the live version."""
    base_lr = vote_logratios(model, tokenizer, eval_votes, adapter_off=True, batch_size=gate_config.batch_size,
                             max_length=config.max_length)
    kw = dict(beta=config.kto_beta, config=gate_config, max_length=config.max_length)
    live_version, candidate, live = _live_and_candidate(
        model, store, data_dir, base_shapes, config,
        lambda adapter_off, fixed: measure_kto(model, tokenizer, eval_votes, base_lr, adapter_off=adapter_off,
                                               cache=fixed and fixed.regression, **kw), base_model_dir)
    gate = decide_kto(candidate, live, gate_config)
    return _evaluation(candidate, live_version, live, gate), gate


def _votes_separated(model, tokenizer, eval_votes, store, data_dir, base_shapes, config, gate_config, evaluation,
                     gate, base_model_dir):
    """A version trained on pairs and votes, gated as DPO: the held-out votes add the vote
    accuracy and vote margin checks (``tuning.gate.vote_checks``)."""
    base_lr = vote_logratios(model, tokenizer, eval_votes, adapter_off=True, batch_size=gate_config.batch_size,
                             max_length=config.max_length)
    kw = dict(beta=config.kto_beta, config=gate_config, max_length=config.max_length)
    _, candidate, live = _live_and_candidate(
        model, store, data_dir, base_shapes, config,
        lambda adapter_off, _: measure_votes(model, tokenizer, eval_votes, base_lr, adapter_off=adapter_off, **kw),
        base_model_dir)
    evaluation = {**evaluation, **candidate, "live": {**evaluation["live"], **live}}
    return _with_checks(evaluation, gate, vote_checks(candidate, live, gate_config))


def _evaluate_sft(model, tokenizer, heldout, store, data_dir, base_shapes, config, gate_config, base_model_dir):
    """``_evaluate`` for an SFT version: the regression set and the data set's held-out
    questions, answered by the new adapter and by the live version (tuning.gate.decide_sft)."""
    live_version, candidate, live = _live_and_candidate(
        model, store, data_dir, base_shapes, config,
        lambda adapter_off, fixed: measure_sft(model, tokenizer, heldout, adapter_off=adapter_off, config=gate_config,
                                               cache=fixed and fixed.regression), base_model_dir)
    gate = decide_sft(candidate, live, gate_config)
    return _evaluation(candidate, live_version, live, gate), gate


def _domain_kept(model, tokenizer, domain, store, data_dir, base_shapes, config, gate_config, evaluation, gate,
                 base_model_dir):
    """A DPO version after an SFT one: the domain's held-out questions must stay answered
    (``tuning.gate.domain_kept``), one more check beside the DPO gate's own."""
    import dataclasses

    only_domain = dataclasses.replace(gate_config, golden=())
    _, candidate, live = _live_and_candidate(
        model, store, data_dir, base_shapes, config,
        lambda adapter_off, fixed: measure_sft(model, tokenizer, domain, adapter_off=adapter_off, config=only_domain,
                                               cache=fixed and fixed.regression), base_model_dir)
    evaluation = {**evaluation, "domain": candidate["domain"], "domain_passed": candidate["domain_passed"],
                  "domain_total": candidate["domain_total"], "live": {**evaluation["live"], "domain": live["domain"],
                  "domain_passed": live["domain_passed"], "domain_total": live["domain_total"]}}
    return _with_checks(evaluation, gate, [domain_kept(candidate, live, gate_config)])


def _live_and_candidate(model, store, data_dir, base_shapes, config, measure_one, base_model_dir):
    """(live version, the new adapter's figures, the live version's figures), each from
    ``measure_one(adapter_off, fixed)`` with the adapter to measure active: 'default' for
    the new one (``fixed`` None), then the live version (``live_active``) with what is kept
    of it (``Kept``): the next job's gate reads what this one answered and scored."""
    model.set_adapter("default")
    candidate = measure_one(False, None)
    with live_active(model, store, data_dir, base_shapes, config, base_model_dir) as (live_version, adapter_off, fixed):
        return live_version, candidate, measure_one(adapter_off, fixed)


@contextlib.contextmanager
def live_active(model, store, data_dir, base_shapes, config, base_model_dir):
    """With the live version answering: yields (live version or None, adapter_off, what is
    kept of it: ``Kept``). The live version's folder, validated against its recorded hash,
    is loaded beside the model's adapter as 'live' and removed after (or the adapter is
    switched off when the base model is live)."""
    live_version = store.live_version()
    if live_version is None:
        yield None, True, kept(base_model_dir, data_dir, None)
        return
    row = store.adapter(live_version)
    folder = DataPaths(data_dir).version_folder(row)
    validate_adapter(folder, base_shapes=base_shapes, max_rank=config.max_rank, expected_hash=row["content_hash"])
    active = model.active_adapter
    model.load_adapter(folder, adapter_name="live")
    model.set_adapter("live")
    try:
        yield live_version, False, kept(base_model_dir, data_dir, row["content_hash"])
    finally:
        model.set_adapter(active)
        model.delete_adapter("live")


def _with_checks(evaluation: dict, gate: GateResult, checks: list[dict]) -> tuple[dict, GateResult]:
    """More checks beside the gate's own (held-out votes, the domain kept, ``users_agree``),
    in the verdict and in the version's eval_json."""
    gate = GateResult(gate.passed and all(c["passed"] for c in checks), gate.checks + checks)
    return {**evaluation, "checks": gate.checks, "passed": gate.passed, "summary": gate.summary()}, gate


def _evaluation(candidate: dict, live_version, live: dict, gate: GateResult) -> dict:
    """What the version's eval_json holds: the candidate's figures, the live version's, the verdict."""
    return {
        **{k: v for k, v in candidate.items()},
        "live_version": live_version,
        "live": live,
        "checks": gate.checks,
        "passed": gate.passed,
        "summary": gate.summary(),
    }


# -- recovery ------------------------------------------------------------------------------


def remove_leftovers(store: Any, data_dir: Path) -> None:
    """Remove what jobs no longer running left in adapters/: their temporary folders, and
    version-named folders that no registry row claims (a process killed between the rename
    and the insert). Jobs that died are failed first by ``loop.jobs.recover_stale_jobs``."""
    root = DataPaths(data_dir).adapters
    if root.is_dir():
        running = {j["id"] for j in store.jobs("running")}
        registered = {a["name"] for a in store.adapters()}
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                job_id = entry.name[len(TMP_PREFIX):].split("-")[0]
                if job_id not in running:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and _NAME.fullmatch(entry.name) and entry.name not in registered:
                shutil.rmtree(entry, ignore_errors=True)
