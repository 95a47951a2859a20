"""One rank of a training run under torchrun, for tests/test_distributed.py (and the figures
in docs/architecture.md): the tiny checkpoint's pairs trained by ``tuning.dpo.train_loop``,
the trained LoRA weights saved by rank 0.

    torchrun --nproc-per-node 2 tests/dist_worker.py CHECKPOINT PAIRS.jsonl OUT.pt CONFIG_JSON [MODE]

Without torchrun it is the one-process run. MODE: "train" (default); "cancel" (rank 0's stop
check says stop from step 2); "fail" (rank 1 raises at step 2).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(checkpoint: str, pairs_file: str, out: str, config_json: str, mode: str = "train") -> int:
    import torch

    from tuning import distributed
    from tuning.config import TrainConfig
    from tuning.dpo import Cancelled, train_loop
    from tuning.trainer import build_model

    torch.set_num_threads(1)  # microsecond ops on a tiny model: threads only wait (tests/conftest.py)
    world = distributed.start()
    config = TrainConfig().replace(**json.loads(config_json))
    pairs = [json.loads(line) for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    model, tokenizer = build_model(Path(checkpoint), config)
    rows: list[dict] = []

    def progress(row: dict) -> None:
        rows.append(row)
        if mode == "fail" and world.rank == 1 and row["step"] == 2:
            raise RuntimeError("rank 1 fails on purpose")

    try:
        metrics = train_loop(model, tokenizer, pairs, config, progress,
                             should_stop=lambda: mode == "cancel" and world.leader and len(rows) >= 2)
    except Cancelled as e:
        print(f"rank {world.rank}: cancelled: {e}", flush=True)
        distributed.finish()
        return 130
    if world.leader:
        lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        torch.save({"lora": lora, "rows": rows, "metrics": metrics, "processes": world.size}, out)
    print(f"rank {world.rank}: done, {metrics['steps']} steps, {metrics['seconds_per_step']} s/step", flush=True)
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
