"""Benchmark: seconds per DPO step in one process and under torchrun with several.

    python bench/processes_bench.py --model DIR [--pairs 32] [--threads 1]          # one process
    torchrun --nproc-per-node 2 bench/processes_bench.py --model DIR [--pairs 32]   # two (1 thread each)

Trains ``tuning.dpo.train_loop`` (reference once, the machine's number format, batch 4) on
synthetic pairs (``tuning.synthetic`` questions; chosen one sentence, rejected three: on
SmolLM2's tokenizer prompts of about 35 tokens, answers of 15 and 39) and prints one JSON line from rank 0:
processes, threads per process, steps, seconds per step (after the reference pass, the
first step left out), the format and the CPU. Documented in docs/architecture.md
"Training over several processes"; not a test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_pairs(n: int) -> list[dict]:
    from tuning.synthetic import prompts

    out = []
    for i, q in enumerate(prompts()[:n]):
        one = f"Here is a short answer to your question about item {i}."
        out.append({"id": f"s{i:04d}", "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": one}],
                    "rejected": [{"role": "assistant", "content": one + " It goes on with a second sentence that "
                                 "adds little. And a third one, which repeats what the first two said."}]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()

    import torch

    from assistant.precision import cpu_info, describe_cpu, machine_format
    from tuning import distributed
    from tuning.config import TrainConfig
    from tuning.dpo import train_loop
    from tuning.trainer import build_model

    if a.threads:
        torch.set_num_threads(a.threads)
    world = distributed.start()
    fmt = machine_format(a.dtype)
    config = TrainConfig().replace(dtype=fmt.dtype, epochs=a.epochs)
    model, tokenizer = build_model(a.model, config)
    marks: list[float] = []
    t0 = time.monotonic()
    train_loop(model, tokenizer, synthetic_pairs(a.pairs), config, progress=lambda row: marks.append(time.monotonic()))
    if world.leader:
        per_step = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
        print(json.dumps({"processes": world.size, "threads": torch.get_num_threads(), "pairs": a.pairs,
                          "steps": len(marks), "seconds_per_step": round(per_step, 3),
                          "seconds": round(time.monotonic() - t0, 1), "format": fmt.dtype,
                          "cpu": describe_cpu(*cpu_info()), "model": a.model.name}), flush=True)
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
