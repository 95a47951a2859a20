"""Benchmark: fine-tuning methods side by side on one domain (issue 16): full fine-tuning,
LoRA at two ranks and IA3, each trained the same way on the same rows.

    # the full run: 164 Quorvia rows x 4 epochs per method (84 steps each), 41 held-out
    # paraphrases and the 63-question regression set: 8.5 min measured on 2 EPYC cores in
    # bf16 (2026-11-30; about 1 s a step), longer beside another training job. Not under
    # nice beside a busy job: the figures are ratios between methods run one after another
    # (README, "Methods compared").
    HF_HUB_OFFLINE=1 ASSISTANT_MODELS_DIR=/tmp/data/models .venv/bin/python bench/methods_bench.py
    # a smoke run: 2 steps on 8 rows, 4 held-out questions, no regression set
    HF_HUB_OFFLINE=1 .venv/bin/python bench/methods_bench.py --steps 2 --limit 8 --heldout-limit 4 --no-regression

On the embedded SmolLM2-135M, the training rows of ``examples/quorvia`` (read and checked
by ``tuning.dataset.read_dataset``, as ``app.py dataset check`` does) train every method
with the SFT job's own loss and loop (``tuning.sft.train_sft`` over ``tuning.dpo.optimise``:
mean NLL of the answer tokens, AdamW, linear decay, clip 1.0): the same rows in the same
order (one seed), the same epochs and batch (``tuning.sft.SFT_DEFAULTS``), and a learning
rate per method family (``METHODS``, sources beside each). Then each version answers the
held-out paraphrases greedily and is scored by the SFT gate's own measure
(``tuning.gate.measure_sft``: ``domain_passes``, and the regression set unless
``--no-regression``); the ``base`` row is the untrained model on the same questions.

The methods:

- ``full``: every weight trainable (tied embeddings included);
- ``lora-r4``, ``lora-r16``: LoRA on every linear layer (peft's "all-linear"), alpha = 2r,
  built by ``tuning.trainer.load_for_training`` exactly as a job builds it;
- ``ia3``: IA3, learned vectors that rescale the key and value outputs and the input of the
  MLP's down projection (peft's default targets for Llama); the fewest parameters.

Why IA3 and not prompt or prefix tuning: the shared loss (``tuning.dpo.sequence_logps``)
runs the base model's backbone directly; LoRA and IA3 live inside its linear layers, so the
loss sees them, while prompt and prefix tuning add virtual tokens in ``PeftModel.forward``,
which that loss bypasses. They would need another loss path and would no longer be trained
the same way.

**What can be served.** vLLM hot-swaps LoRA adapters only. Each adapter trained here is
saved and put through ``assistant.adapters.validate_adapter``, the check promotion runs
before vLLM loads a version; the table prints its answer. The LoRA adapters pass (rank at
most ``assistant.limits.MAX_LORA_RANK``); IA3 is refused (not LoRA: vLLM has no IA3
adapters); a fully fine-tuned model is a new base model, served only by restarting vLLM on
its weights: no hot-swap, no canary beside the live version, and a full copy of the model
per version. Nothing is served by this benchmark.

Each method runs in its own process, so its peak memory (the process's peak resident set,
``VmHWM``, taken after training, before answers are generated) is its own. One table is
printed with the date, the CPU (model, flags, PyTorch's kernel level), the load average
and the number format. Documented, not a test: timings on a shared machine are noisy; read ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOMAIN = ROOT / "examples" / "quorvia"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "none" (the base, untrained), "full", "lora", "ia3"
    learning_rate: float
    rank: int = 0


# Learning rates per family, as recommended where the methods are benchmarked by peft:
# - full fine-tuning 2e-5: peft's MetaMathQA method comparison trains full fine-tuning of
#   Llama-3.2-3B at 1e-5 (method_comparison/MetaMathQA/experiments/full-finetuning/
#   llama-3.2-3B-lr_0.00001); every weight moves, so the step must be small. We take the top
#   of the usual 1e-5..2e-5 range: 84 steps are few.
# - LoRA 2e-4: peft's LoRA guide says "Use learning rate 1e-4 to 5e-4" (docs/source/
#   developer_guides/method_comparison/lora.md; its MetaMathQA default is 1e-4). The
#   job's SFT default, 5e-4 (tuning.sft.SFT_DEFAULTS), is the top of that range and cost the
#   regression set (README, "Teaching it a domain"), so the middle of it here.
# - IA3 5e-3: peft's MetaMathQA IA3 run uses 5e-3 (experiments/ia3/llama-3.2-3B-all-attn-
#   5k-lr0.005); vectors initialised at 1.0 that only rescale need far larger steps.
METHODS = {m.name: m for m in (
    Method("base", "none", 0.0),
    Method("full", "full", 2e-5),
    Method("lora-r4", "lora", 2e-4, rank=4),
    Method("lora-r16", "lora", 2e-4, rank=16),
    Method("ia3", "ia3", 5e-3),
)}
DEFAULT_METHODS = ",".join(METHODS)
# Bytes per trainable parameter that AdamW in fp32 adds beyond the weight itself: the
# gradient (4) and the two moments m and v (4 + 4). With the fp32 weight, 16.
ADAMW_STATE_BYTES = 12


def peak_mb() -> float:
    """This process's peak resident memory, MB. Linux's VmHWM belongs to the process's own
    memory map, so it starts afresh at exec; ``ru_maxrss`` does not (Linux carries it over
    exec, so a worker would inherit its parent's peak: every tiny-model worker read the
    pytest process's 583 MB), hence ``ru_maxrss`` only where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build(model_dir: Path, method: Method, config):
    """(model to train, tokenizer): the base itself (``full``: every weight trainable;
    ``none``: frozen) or the base wrapped by peft, in fp32 master weights as a job loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method.kind == "lora":
        from tuning.trainer import load_for_training

        return load_for_training(model_dir, config.replace(rank=method.rank, alpha=2 * method.rank), None, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method.kind == "ia3":
        from peft import IA3Config, get_peft_model

        torch.manual_seed(config.seed)
        return get_peft_model(model, IA3Config(task_type="CAUSAL_LM")), tokenizer  # peft's targets for the architecture
    model.requires_grad_(method.kind == "full")
    return model, tokenizer


def serving(model, model_dir: Path, method: Method) -> tuple[str, float]:
    """(can vLLM hot-swap it, and why; MB to ship one version). Adapters are saved and put
    through the validation promotion runs; a full fine-tune is a new base model."""
    if method.kind == "none":
        return "(the base)", 0.0
    if method.kind == "full":
        # parameters(), not state_dict(): the tied embedding and LM head are one tensor,
        # saved once (the state dict lists it twice: 651 MB instead of 538 for SmolLM2)
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        return "no: a new base model (restart vLLM on it, one per server)", round(size, 1)
    from assistant.adapters import InvalidAdapter, base_weight_shapes, validate_adapter
    from assistant.limits import MAX_LORA_RANK

    with tempfile.TemporaryDirectory(prefix="methods-bench-") as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
        try:
            info = validate_adapter(Path(tmp), base_shapes=base_weight_shapes(model_dir), max_rank=MAX_LORA_RANK)
        except InvalidAdapter as e:
            return f"no: {e}", round(size, 2)
    return f"yes: LoRA r={info.rank}, validated as promotion does", round(size, 2)


def run_method(method: Method, model_dir: Path, args) -> dict:
    """Train and measure one method in this process; one result row."""
    import torch

    from assistant.precision import machine_format
    from tuning.config import TrainConfig
    from tuning.cost import estimate_cost, trainable_params
    from tuning.dataset import read_dataset
    from tuning.dpo import Cancelled
    from tuning.gate import REGRESSION, GateConfig, measure_sft
    from tuning.sft import tokenize_example, train_sft

    fmt = machine_format(args.dtype)
    # replay=0: the methods compared on the data set's rows alone, as the table was measured;
    # the job's replayed general answers (tuning.sft.replay_rows) would be the same for all.
    config = TrainConfig(learning_rate=args.lr.get(method.name, method.learning_rate), epochs=args.epochs,
                         batch_size=args.batch_size, dtype=fmt.dtype, price_per_hour=args.price_per_hour,
                         replay=0)
    model, tok = build(model_dir, method, config)
    report = read_dataset(Path(args.train), Path(args.heldout), tokenizer=tok, max_length=config.max_length)
    if not report.ok:
        raise ValueError(f"the data set is refused: {report.errors[:3]}")
    rows, held = report.rows[: args.limit], report.heldout[: args.heldout_limit]
    trainable, total, share = trainable_params(model)
    steps_planned = math.ceil(len(rows) / config.batch_size) * config.epochs
    history: list[dict] = []
    if method.kind != "none":
        stop = (lambda: len(history) >= args.steps) if args.steps else None
        try:
            train_sft(model, tok, rows, config, progress=history.append, should_stop=stop)
        except Cancelled:  # --steps reached: the steps done are the measurement
            model.eval()
    train_peak = peak_mb()
    seconds = history[-1]["seconds"] if history else 0.0
    per_epoch = math.ceil(len(rows) / config.batch_size)
    epoch_tokens = sum(len(t.prompt) + len(t.answer) for t in (tokenize_example(tok, r, config.max_length) for r in rows))
    tokens = epoch_tokens * len(history) / per_epoch if per_epoch else 0
    hot_swap, ship_mb = serving(model, model_dir, method)
    gate = GateConfig(golden=REGRESSION if args.regression else ())
    m = measure_sft(model, tok, held, adapter_off=False, config=gate)
    return {
        "method": method.name, "kind": method.kind, "learning_rate": config.learning_rate if method.kind != "none" else None,
        "dtype": fmt.dtype, "trainable": trainable, "total": total, "share": share,
        "adamw_state_mb": round(trainable * ADAMW_STATE_BYTES / 1e6, 1),
        "rows": len(rows), "epochs": config.epochs, "batch_size": config.batch_size,
        "steps": len(history), "steps_planned": steps_planned if method.kind != "none" else 0,
        "first_loss": round(history[0]["loss"], 4) if history else None,
        "last_loss": round(history[-1]["loss"], 4) if history else None,
        "train_seconds": seconds, "seconds_per_step": round(seconds / len(history), 2) if history else None,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "peak_train_mb": train_peak, "peak_mb": peak_mb(),
        "domain_passed": m["domain_passed"], "domain_total": m["domain_total"], "domain_share": m["domain_share"],
        "golden_passed": m["golden_passed"] if args.regression else None, "golden_total": m["golden_total"] if args.regression else None,
        "usd": estimate_cost(seconds, config.price_per_hour, total, trainable)["estimated_usd"],
        "hot_swap": hot_swap, "ship_mb": ship_mb, "torch_threads": torch.get_num_threads(),
        "answers": [{"prompt": a["prompt"], "answer": a["answer"]} for a in m["answers"][:3]],
    }


def run_worker(name: str, argv: list[str]) -> dict:
    """``run_method`` in a process of its own (its peak memory is its own); its result row."""
    cmd = [sys.executable, __file__, "--worker", name, *argv]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        return {"method": name, "error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(lines[-1])


COLUMNS = ("method", "lr", "trainable params (% of total)", "AdamW state MB (12 B/param)", "peak RSS MB (training)",
           "train s", "s/step", "tokens/s", "held-out domain right", "regression set", "cost USD", "vLLM hot-swap",
           "MB per version")


def table(results: list[dict], price_per_hour: float) -> str:
    """The results as one Markdown table (``COLUMNS``); a failed method shows its error."""
    base = next((r for r in results if r.get("kind") == "none" and "error" not in r), None)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'].strip().splitlines()[-1][:200]} |" + " |" * (len(COLUMNS) - 2))
            continue
        trained = r["kind"] != "none"
        domain = f"{r['domain_passed']}/{r['domain_total']}" + (f" ({r['domain_share']:.0%})" if r["domain_total"] else "")
        if trained and base:
            domain += f"; base {base['domain_passed']}/{base['domain_total']}"
        golden = f"{r['golden_passed']}/{r['golden_total']}" if r.get("golden_total") else "not measured"
        if trained and base and base.get("golden_total"):
            golden += f"; base {base['golden_passed']}/{base['golden_total']}"
        steps = f"{r['steps']} of {r['steps_planned']} steps" if r["steps"] != r["steps_planned"] else f"{r['steps']} steps"
        cells = [
            r["method"], f"{r['learning_rate']:g}" if trained else "-",
            f"{r['trainable']:,} ({100 * r['share']:.3g}%)", f"{r['adamw_state_mb']:,}", f"{r['peak_train_mb']:,.0f}",
            f"{r['train_seconds']:.0f} ({steps})" if trained else "-", f"{r['seconds_per_step']}" if trained else "-",
            f"{r['tokens_per_second']}" if trained else "-", domain, golden,
            f"{r['usd']:.4f} at {price_per_hour:g}/h" if trained else "-", r["hot_swap"], f"{r['ship_mb']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_lr(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            raise SystemExit(f"--lr takes METHOD=VALUE with METHOD one of {', '.join(METHODS)}, not {item!r}")
        out[name] = float(value)
    return out


def arguments(argv: list[str] | None = None):
    from tuning.config import TrainConfig
    from tuning.sft import SFT_DEFAULTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of: {DEFAULT_METHODS}")
    p.add_argument("--train", default=str(DOMAIN / "train.jsonl"), help="training rows (any form tuning.dataset reads)")
    p.add_argument("--heldout", default=str(DOMAIN / "heldout.jsonl"), help="held-out questions, with expect words")
    p.add_argument("--limit", type=int, default=None, help="train on the first N rows only")
    p.add_argument("--heldout-limit", type=int, default=None, help="score the first N held-out questions only")
    p.add_argument("--steps", type=int, default=None, help="stop each method after N steps (smoke runs)")
    p.add_argument("--epochs", type=int, default=SFT_DEFAULTS["epochs"], help="default: the SFT job's")
    p.add_argument("--batch-size", type=int, default=SFT_DEFAULTS["batch_size"], help="default: the SFT job's")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE", help="another learning rate for a method")
    p.add_argument("--no-regression", dest="regression", action="store_false", help="skip the 63-question regression set")
    p.add_argument("--price-per-hour", type=float, default=TrainConfig().price_per_hour, help="USD per hour of this machine")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="number format (default auto: what a job on this machine picks)")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    p.add_argument("--model", type=Path, help="a prepared checkpoint folder instead of the embedded model")
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lr = parse_lr(args.lr)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {DEFAULT_METHODS}")
    return args, argv if argv is not None else sys.argv[1:]


def main(argv: list[str] | None = None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args, raw = arguments(argv)
    if args.worker:
        print(json.dumps(run_method(METHODS[args.worker], args.model, args)), flush=True)
        return []

    from assistant.precision import machine_format

    fmt = machine_format(args.dtype)
    if args.model is None:
        from assistant.model_files import prepare_embedded_model

        args.model = prepare_embedded_model(args.models_dir)
    worker_argv = [a for a in raw if a != "--methods" and not a.startswith("--methods=")]
    if "--methods" in raw:  # drop its value too: each worker is told its one method
        i = raw.index("--methods")
        worker_argv = raw[:i] + raw[i + 2:]
    worker_argv = [*worker_argv, "--model", str(args.model)]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {fmt.cpu}; {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; number format {fmt.dtype} ({fmt.reason})", flush=True)
    print(f"model {args.model.name}; data {args.train} (limit {args.limit}), held out {args.heldout} "
          f"(limit {args.heldout_limit}); {args.epochs} epochs, batch {args.batch_size}"
          + (f", at most {args.steps} steps" if args.steps else ""), flush=True)
    results = []
    for name in args.methods.split(","):
        print(f"-- {name}", flush=True)
        t = time.monotonic()
        results.append(run_worker(name, worker_argv))
        print(f"   {time.monotonic() - t:.0f} s: {json.dumps(results[-1])[:1500]}", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d', time.gmtime())}; CPU: {fmt.cpu}; format {fmt.dtype}; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(results, args.price_per_hour))
    by = {r["method"]: r for r in results if "error" not in r}
    if by.get("full", {}).get("seconds_per_step") and by.get("lora-r16", {}).get("seconds_per_step"):
        print(f"\nfull fine-tuning / LoRA r=16, seconds per step: "
              f"{by['full']['seconds_per_step'] / by['lora-r16']['seconds_per_step']:.2f}x "
              "(tuning/cost.py's estimate for DPO, 8/6 of the work per token; for SFT, with no reference pass, 6/4)")
    return results


if __name__ == "__main__":
    main()
