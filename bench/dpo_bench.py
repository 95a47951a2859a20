"""Benchmark: one DPO job on 256 on-policy pairs, and TRL's DPOTrainer vs our loop, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_bench.py               # everything (~20-30 min on 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_bench.py --compare-only --compare-steps 8

Prints, on the embedded SmolLM2-135M: the time from the start of a job to a validated,
gated version ready to promote (target: under 10 minutes for 256 pairs), seconds per step,
peak memory, and the same steps run by TRL and by our loop on the same pairs. Each
measurement runs in its own process so peak memory is its own. Documented, not a test:
timings on a shared machine are noisy, so read the figures side by side from one run.
Pairs use the synthetic preference of tuning/synthetic.py (the model's own greedy answer
rejected, its first sentence chosen), 2 personas x the question list; the gate's length
band is widened to 75% because this preference halves answers on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERSONAS = ["", "You are a friendly assistant.", "Answer the user's question."]


def peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def make_pairs(model_dir: Path, n_train: int, n_eval: int, answer_tokens: int) -> tuple[list, list, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.precision import machine_format
    from tuning.generation import greedy_answers
    from tuning.synthetic import first_sentence, prompts

    convs = []
    for persona in PERSONAS:
        for q in prompts():
            convs.append(([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": q}])
    held_q = set(prompts()[::5])  # held-out questions never appear in training, in any persona
    held = [c for c in convs if c[-1]["content"] in held_q][: n_eval * 2]
    train = [c for c in convs if c[-1]["content"] not in held_q][: int(n_train * 1.4)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=machine_format().torch_dtype())  # as served
    t = time.monotonic()
    answers = greedy_answers(model, tok, train + held, max_new_tokens=answer_tokens)
    seconds = time.monotonic() - t
    # Only answers longer than one sentence leave something for the user to cut.
    pairs = [{"id": f"b{i:04d}", "prompt": c, "chosen": [{"role": "assistant", "content": first_sentence(a)}],
              "rejected": [{"role": "assistant", "content": a}], "signal": "edit"}
             for i, (c, (a, _)) in enumerate(zip(train + held, answers)) if first_sentence(a) != a]
    is_held = lambda p: p["prompt"][-1]["content"] in held_q  # noqa: E731
    return [p for p in pairs if not is_held(p)][:n_train], [p for p in pairs if is_held(p)][:n_eval], seconds


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    import torch

    from assistant.paths import DataPaths
    from assistant.precision import machine_format
    from store import Store
    from tuning.config import TrainConfig
    from tuning.gate import GateConfig
    from tuning.synthetic import is_one_sentence
    from tuning.trainer import load_for_training, train_adapter

    pairs = [json.loads(x) for x in open(args.pairs_file)]
    eval_pairs = [json.loads(x) for x in open(args.eval_file)]
    from tuning.train import _value

    lever = {k: _value(v) for k, v in (x.split("=", 1) for x in args.set)}
    if args.worker == "full":
        data = Path(tempfile.mkdtemp(prefix="bench-data-"))
        store = Store(DataPaths(data).database)
        t = time.monotonic()
        r = train_adapter(pairs, eval_pairs, store=store, data_dir=data, base_model_dir=Path(args.model_dir),
                          config=TrainConfig(dtype=args.dtype).replace(**lever), gate_config=GateConfig(max_length_drift=0.75),
                          created_by="bench")
        wall = time.monotonic() - t
        row = store.adapter(r.version) if r.version else {}
        ev = row.get("eval_json") or {}
        print(json.dumps({
            "measure": "full job", "status": r.status, "error": r.error, "job_seconds": round(wall, 1),
            "train_seconds": row.get("train_seconds"), "steps": (row.get("metrics_json") or {}).get("steps"),
            "seconds_per_step": (row.get("metrics_json") or {}).get("seconds_per_step"),
            "gate_passed": row.get("gate_passed"), "gate": ev.get("summary"),
            "base_accuracy": (ev.get("live") or {}).get("preference_accuracy"),
            "accuracy": ev.get("preference_accuracy"), "reward_margin": ev.get("reward_margin"),
            "one_sentence_answers": sum(is_one_sentence(a["answer"]) for a in ev.get("answers", [])),
            "base_one_sentence": sum(is_one_sentence(a["answer"]) for a in (ev.get("live") or {}).get("answers", [])),
            "mean_tokens": [(ev.get("live") or {}).get("mean_answer_tokens"), ev.get("mean_answer_tokens")],
            "answers": len(ev.get("answers", [])), "golden": f"{ev.get('golden_passed')}/{ev.get('golden_total')}",
            "cost": row.get("cost_json"), "trainable_share": row.get("trainable_share"), "peak_mb": peak_mb(),
            "failed_checks": [c["check"] for c in ev.get("checks", []) if not c["passed"]],
            "phases": ((store.job(r.job_id) or {}).get("progress_json") or {}).get("phases") if r.job_id else None,
        }), flush=True)
        return
    config = TrainConfig(epochs=1, dtype=machine_format(args.dtype).dtype).replace(trainer=args.worker, **lever)
    subset = pairs[: args.steps * config.batch_size]
    model, tok = load_for_training(Path(args.model_dir), config, None, Path("."))
    rows: list[dict] = []
    t = time.monotonic()
    if args.worker == "trl":
        from tuning.trl_trainer import train_trl

        train_trl(model, tok, subset, config, rows.append)
    else:
        from tuning.dpo import train_loop

        train_loop(model, tok, subset, config, rows.append)
    wall = time.monotonic() - t
    steady = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]  # without the first step's warm-up
    print(json.dumps({
        "measure": args.worker, "steps": len(rows), "wall_seconds": round(wall, 1),
        "seconds_per_step": round(sum(steady) / len(steady), 2) if steady else None,
        "first_step_loss": round(rows[0]["loss"], 4), "first_step_dpo_loss": round(rows[0].get("dpo_loss", 0), 4),
        "last_margin": round(rows[-1]["reward_margin"], 4), "last_reward_acc": rows[-1]["reward_accuracy"],
        "peak_mb": peak_mb(), "torch_threads": torch.get_num_threads(), "dtype": config.dtype,
        # Before the first step: tokenising, and with reference="once" the reference pass.
        "before_steps_seconds": round(wall - rows[-1]["seconds"], 1), "pairs": len(subset), "set": lever,
    }), flush=True)


# Levers for a faster job, measured one by one on top of the default recipe, then together.
LEVERS = [
    ("default recipe", []),
    ("reference once", ["reference=once"]),
    ("batches by length", ["by_length=true"]),
    ("LoRA on the top 15 of 30 layers", ["lora_layers=15"]),
    ("LoRA on the top 8 of 30 layers", ["lora_layers=8"]),
    ("all three (top 15)", ["reference=once", "by_length=true", "lora_layers=15"]),
]


def run_levers(common: list[str], steps: int, total_pairs: int, epochs: int) -> list[dict]:
    rows = []
    for name, sets in LEVERS:
        r = run_worker("loop", common + [x for s in sets for x in ("--set", s)], steps)
        r["lever"] = name
        if r.get("seconds_per_step"):
            n = r["pairs"]
            # One job of total_pairs: the work before the first step scales with the pairs,
            # then ceil(pairs / 4) steps per epoch.
            r["job_train_s"] = round(r["before_steps_seconds"] * total_pairs / n
                                     + -(-total_pairs // 4) * epochs * r["seconds_per_step"])
        print("  ", json.dumps(r), flush=True)
        rows.append(r)
    return rows


def run_worker(kind: str, common: list[str], steps: int, settings: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps), *common,
           *[x for kv in settings for x in ("--set", kv)]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        return {"measure": kind, "error": out.stderr[-1500:]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--eval-pairs", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=48, help="length cap of the on-policy answers")
    p.add_argument("--compare-steps", type=int, default=8, help="steps each trainer runs side by side")
    p.add_argument("--compare-only", action="store_true", help="skip the full job")
    p.add_argument("--compare-twice", action="store_true", help="run loop, trl, loop, trl (load on a shared machine drifts)")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="number format (default auto: what a job on this machine picks)")
    p.add_argument("--levers", action="store_true",
                   help="only the levers for a faster job (s/step of each, and a 256-pair job's training time)")
    p.add_argument("--job-pairs", type=int, default=256, help="with --levers: the job size the estimate is for")
    p.add_argument("--job-only", action="store_true", help="skip the side-by-side steps: only full jobs")
    p.add_argument("--job-set", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="one more full job with these TrainConfig settings (after the defaults' job), side by side")
    p.add_argument("--skip-defaults", action="store_true", help="with --job-only: only the --job-set jobs")
    p.add_argument("--pairs-dir", type=Path, help="keep the on-policy pairs here and reuse them on the next run")
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["loop", "trl", "full"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", help=argparse.SUPPRESS)
    p.add_argument("--eval-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import choose_format

    fmt = choose_format(args.dtype)
    print(f"{time.strftime('%Y-%m-%d')}; CPU: {fmt.cpu}; format {fmt.dtype} ({fmt.reason})", flush=True)
    model_dir = prepare_embedded_model(args.models_dir)
    print(f"model {model_dir.name}, {os.cpu_count()} CPUs; making {args.pairs}+{args.eval_pairs} on-policy pairs", flush=True)
    tmp = args.pairs_dir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if (tmp / "train.jsonl").exists() and (tmp / "eval.jsonl").exists():
        train = [json.loads(x) for x in open(tmp / "train.jsonl")]
        held = [json.loads(x) for x in open(tmp / "eval.jsonl")]
        print(f"  pairs from {tmp}: {len(train)} training + {len(held)} held-out")
    else:
        train, held, gen_s = make_pairs(model_dir, args.pairs, args.eval_pairs, args.answer_tokens)
        print(f"  greedy answers: {gen_s:.0f} s (before the job; users' chats in real life); "
              f"{len(train)} training + {len(held)} held-out pairs kept (answers longer than one sentence)")
        (tmp / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
        (tmp / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in held))
    common = ["--dtype", args.dtype, "--model-dir", str(model_dir), "--pairs-file", str(tmp / "train.jsonl"), "--eval-file", str(tmp / "eval.jsonl")]

    if args.levers:
        from tuning.config import TrainConfig, epochs_for

        epochs = epochs_for(TrainConfig(), args.job_pairs)
        rows = run_levers(common, args.compare_steps, args.job_pairs, epochs)
        print(f"\n{time.strftime('%Y-%m-%d')}; CPU: {fmt.cpu}; format {fmt.dtype}; torch threads {os.cpu_count()}")
        print(f"| lever | s/step (steps 2..n) | before the steps (s, {rows[0].get('pairs')} pairs) "
              f"| training of {args.job_pairs} pairs x {epochs} epochs (s, estimated) | peak MB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['lever']} | {r.get('seconds_per_step')} | {r.get('before_steps_seconds')} | {r.get('job_train_s')} "
                  f"| {r.get('peak_mb')} |" if "error" not in r else f"| {r['lever']} | failed: {r['error'][-200:]} | | | |")
        return

    if args.job_only:
        jobs = []
        for settings in ([] if args.skip_defaults else [""]) + args.job_set:
            print(f"-- full job: {len(train)} pairs, TrainConfig {settings or 'defaults'}", flush=True)
            jobs.append({"settings": settings or "defaults", **run_worker("full", common, 0, settings.split())})
            print("  ", json.dumps(jobs[-1]), flush=True)
        print(f"\n{time.strftime('%Y-%m-%d')}; CPU: {fmt.cpu}; format {fmt.dtype}; {len(train)} training pairs, "
              f"gate on {len(held)} held-out pairs")
        print("| TrainConfig | steps | s/step | training s | pairs to a gated version (s) | one-sentence held-out answers "
              "(base) | regression set | gate |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for j in jobs:
            if j.get("error") and not j.get("status"):
                print(f"| {j['settings']} | failed: {j['error'][-200:]} | | | | | | |")
                continue
            gate = "passed" if j.get("gate_passed") else "refused: " + ", ".join(j.get("failed_checks") or [])
            print(f"| {j['settings']} | {j.get('steps')} | {j.get('seconds_per_step')} | {j.get('train_seconds')} "
                  f"| {j.get('job_seconds')} | {j.get('one_sentence_answers')}/{j.get('answers')} "
                  f"({j.get('base_one_sentence')}) | {j.get('golden')} | {gate} |")
        return

    from tuning.config import TRL_RECIPE

    # The same objective on both sides: our loop with what TRL's DPOTrainer computes (whole
    # answers, no replay); the trl worker takes it from TrainConfig.replace(trainer="trl").
    recipe = [f"{k}={json.dumps(v)}" for k, v in TRL_RECIPE.items()]
    results = []
    for kind in ("loop", "trl", "loop", "trl") if args.compare_twice else ("loop", "trl"):
        print(f"-- {kind}: {args.compare_steps} steps of 4 pairs", flush=True)
        results.append(run_worker(kind, common, args.compare_steps, recipe if kind == "loop" else ()))
        print("  ", json.dumps(results[-1]), flush=True)
    print("\n| trainer | format | s/step (steps 2..n) | step-1 DPO loss | reward margin at last step | peak MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['measure']} | {r.get('dtype')} | {r.get('seconds_per_step')} | {r.get('first_step_dpo_loss')} "
              f"| {r.get('last_margin')} | {r.get('peak_mb')} |")
    if not args.compare_only:
        print(f"\n-- full job: {len(train)} pairs, default TrainConfig, gate on {len(held)} held-out pairs", flush=True)
        full = run_worker("full", common, 0)
        print(json.dumps(full, indent=1))


if __name__ == "__main__":
    main()
