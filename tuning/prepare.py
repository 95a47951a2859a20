"""Answer ahead, while the machine is idle, what the next training job answers first.

Before its first step a feedback job answers the general questions it replays with the
model it starts from (``TrainConfig.replay``) and scores those answers with it (the
reference its replay loss holds the version to); it scores both answers of every pair with
it (the DPO reference). Its gate answers the regression set with the live version, scores
the held-out pairs' answers with the base and the live version, and answers their prompts
with the live version. The replayed and the regression answers depend only on the models
and are kept beside the prepared base models for the next job
(``tuning.sft.ReplayCache``, ``tuning.generation.AnswerCache``). What comes from users'
answers and prompts is kept in the data folder, holding only the pairs the store would give
a job now: the pairs' reference (``tuning.dpo.ReferenceCache``) and what the gate asks of
the fixed versions on the held-out pairs (``tuning.trainer.Kept``). On a 2-core CPU these
are minutes of a job: of a 288-edit job on torch's, MKL's and oneDNN's AVX2 kernels in
float32 (2026-12-07, Intel Xeon), the first step ended at 242 s and the gate took 124 s.
The app runs this in the background at idle priority when it starts, whenever the live
version changes and when feedback has grown (``loop.jobs.Preparer``); a job started
meanwhile stops it and does the rest itself.

    python -m tuning.prepare --data-dir DATA [--models-dir M] [--model DIR] [--set KEY=VALUE ...]

``--set`` takes the settings the app's jobs get (``app.py serve --train-set``): the format
and the replay settings decide which answers a job reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from assistant.paths import DATABASE_ENV, DataPaths, database_option


def prepare(store, data_dir: Path, base_model_dir: Path, config=None, gate_config=None) -> dict:
    """Answer the replayed questions with the model a job would start from and the
    regression set with the live version, each read from its cache where already answered.
    Returns what it did: the live version, the counts and the seconds of each part, and
    when it finished; also kept in ``DATA_DIR/prepared.json`` for the admin console."""
    import torch

    from .config import TrainConfig
    from .gate import GateConfig, regression_answers
    from .generation import keep
    from .pairs import build_preferences
    from .sft import prepare_replay
    from .trainer import base_weight_shapes, build_model, live_active, parent_folder, reference_cache, replay_cache
    from assistant.precision import machine_format
    from store.rows import utc_now

    config = config or TrainConfig()
    gate_config = gate_config or GateConfig()
    fmt = machine_format(config.dtype)
    config = config.replace(dtype=fmt.dtype)  # as the job records it: the answers are kept by format
    done: dict = {"format": fmt.dtype}
    parent = parent_folder(base_model_dir, config, store, data_dir)
    model, tokenizer = build_model(base_model_dir, config, parent)
    t0 = time.monotonic()
    if config.replay:
        done["replayed"] = len(prepare_replay(model, tokenizer, config, replay_cache(base_model_dir, parent)))
    done["replay_s"] = round(time.monotonic() - t0, 1)
    print(f"replayed questions: {done.get('replayed', 0)} answered and scored, or read, in {done['replay_s']} s", flush=True)
    t0 = time.monotonic()
    data = build_preferences(store)
    done["pairs"] = score_pairs(data, model, tokenizer, config, reference_cache(data_dir, base_model_dir, parent))
    done["pairs_s"] = round(time.monotonic() - t0, 1)
    print(f"the store's training pairs: {done['pairs']} scored by the reference, or read, in {done['pairs_s']} s",
          flush=True)
    t0 = time.monotonic()
    model.to("cpu", torch.float32)  # as the gate answers (tuning.trainer.train_adapter)
    with live_active(model, store, data_dir, base_weight_shapes(base_model_dir), config, base_model_dir) as (
            live, adapter_off, fixed):
        done["live_version"] = live
        done["regression"] = len(regression_answers(model, tokenizer, gate_config, adapter_off, fixed.regression))
        done["regression_s"] = round(time.monotonic() - t0, 1)
        print(f"regression set: {done['regression']} answers of {'v%s' % live if live else 'the base model'} "
              f"answered or read in {done['regression_s']} s", flush=True)
        t0 = time.monotonic()
        done["held_out"] = held_out(data, model, tokenizer, config, gate_config, data_dir, base_model_dir,
                                    adapter_off, fixed)
        done["held_out_s"] = round(time.monotonic() - t0, 1)
    print(f"held-out pairs: {done['held_out']} scored by the base and the live version, their prompts answered by "
          f"the live version, or read, in {done['held_out_s']} s", flush=True)
    done["finished_utc"] = utc_now()
    keep(DataPaths(data_dir).prepared, done, "what was prepared is not recorded ({error}); the console cannot show it")
    return done


def score_pairs(data, model, tokenizer, config, cache) -> int:
    """The reference's log-probabilities of the training pairs a job would build from the
    store now (``data``: ``build_preferences``), kept in ``cache``
    (``tuning.dpo.with_reference``; those already kept are read); how many pairs. None
    scored when the job would not train pairs by our DPO loop."""
    from dataclasses import asdict

    from .dpo import early_close_pairs, pad_id, pair_items, with_reference
    from .kto import choose_objective

    if config.reference != "once" or config.trainer == "trl" or config.method == "sft":
        return 0
    pairs, votes = [asdict(p) for p in data.train_pairs], [asdict(u) for u in data.train_unpaired]
    objective = choose_objective(config.objective, pairs, votes) if pairs else "kto"
    if objective == "kto":
        return 0
    if objective == "dpo" and config.early_close:
        pairs += early_close_pairs(pairs)  # as tuning.dpo.train_loop adds them
    with_reference(model, pair_items(tokenizer, pairs, config), pad_id(tokenizer), config.dtype == "bfloat16", cache)
    return len(pairs)


def held_out(data, model, tokenizer, config, gate_config, data_dir, base_model_dir, adapter_off: bool, live) -> int:
    """What the next job's gate asks of the base and the live version on the held-out pairs
    the store would give it now (``data``), asked the way the gate asks it
    (``tuning.trainer.measure_fixed``) and kept in the data folder (``tuning.trainer.Kept``):
    both versions' log-probabilities of the pairs' answers, and the live version's answers
    to their prompts; the live version is active (or, ``adapter_off``, the base is live).
    How many pairs; none for a job the DPO gate would not judge (no held-out pairs)."""
    from dataclasses import asdict

    from .trainer import base_logratios, measure_fixed

    eval_pairs = [asdict(p) for p in data.eval_pairs]
    if not eval_pairs or config.method == "sft":
        return 0
    base, base_lr = base_logratios(model, tokenizer, eval_pairs, data_dir, base_model_dir, config, gate_config)
    measure_fixed(model, tokenizer, eval_pairs, base, base_lr, adapter_off, live, data_dir, config, gate_config)
    return len(eval_pairs)


def _exit_with(parent: int) -> None:
    """The app starts this in its own session (so signals to the app's group do not reach it)
    and stops it when it closes; an app killed outright cannot, so this watches for it."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        print("the app that started this is gone: stopping", flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent").start()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--database", default=database_option(),
                   help=f"a postgresql:// URL or SQLite file instead of DATA_DIR/assistant.db (default ${DATABASE_ENV})")
    p.add_argument("--models-dir", type=Path, default=None, help="prepared models (default DATA_DIR/models)")
    p.add_argument("--model", default=None, help="base checkpoint folder (default: the embedded model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig setting the jobs get")
    p.add_argument("--priority", choices=["background", "normal"], default="background")
    p.add_argument("--parent", type=int, default=None,
                   help="exit when this process (the app that started it) is gone, however it ended")
    a = p.parse_args(argv)
    if a.parent is not None:
        _exit_with(a.parent)
    from .priority import apply

    print(f"priority: {a.priority} ({apply(a.priority)})", flush=True)  # before torch starts its threads
    from assistant.model_files import resolve_model
    from store import Store

    from .config import TrainConfig
    from .train import parse_settings

    try:
        config = TrainConfig().replace(**parse_settings(a.set))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = Store(DataPaths(a.data_dir).database_target(a.database))
    model_dir = resolve_model(a.model, a.models_dir or DataPaths(a.data_dir).models)
    prepare(store, a.data_dir, model_dir, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
