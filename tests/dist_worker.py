"""One rank of a training run under torchrun, for tests/test_distributed.py: 10 of the tiny
model's toy pairs trained by ``tuning.trainer.train_model`` (DPO; SFT on their chosen
answers; KTO on them as votes), the trained LoRA weights saved by rank 0.

    torchrun --nproc-per-node 2 tests/dist_worker.py CHECKPOINT OUT.pt CONFIG_JSON [MODE] [OBJECTIVE]

Without torchrun it is the one-process run. MODE: "train" (default); "cancel" (rank 0's stop
check says stop from step 2); "fail" (rank 1 raises at step 2). OBJECTIVE: dpo (default),
sft, kto, dpo-replay (DPO with 5 fixed replayed answers standing in for the general answers
the tiny model leaves empty, so the replay's split across ranks is exercised).
"""

import contextlib
import json
import sys
from unittest import mock
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(checkpoint: str, out: str, config_json: str, mode: str = "train", objective: str = "dpo") -> int:
    import torch

    from tiny import toy_pairs
    from tuning import distributed
    from tuning.config import TrainConfig
    from tuning.dpo import Cancelled
    from tuning.kto import pairs_as_votes
    from tuning.trainer import build_model, train_model

    torch.set_num_threads(1)  # microsecond ops on a tiny model: threads only wait (tests/conftest.py)
    world = distributed.start()
    config = TrainConfig().replace(**json.loads(config_json))
    pairs, votes = toy_pairs(10), []
    replay = contextlib.nullcontext()
    if objective == "dpo-replay":  # patched for this run only: tests call main() in-process too
        answers = ["the sky is blue.", "seven days.", "paris.", "four.", "water boils at 100 c."]
        replay = mock.patch("tuning.sft.replay_rows", lambda model, tok, count, max_new_tokens=96, **kw: [
            {"id": f"replay-{i}", "messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers[:count])])
        objective = "dpo"
    if objective == "sft":
        pairs = [{"id": p["id"], "messages": p["prompt"] + p["chosen"]} for p in pairs]
    elif objective == "kto":
        pairs, votes = [], pairs_as_votes(pairs)[:10]
    model, tokenizer = build_model(Path(checkpoint), config)
    rows: list[dict] = []

    def progress(row: dict) -> None:
        if "step" not in row:  # a phase row (e.g. how many answers are replayed)
            return
        rows.append(row)
        if mode == "fail" and world.rank == 1 and row["step"] == 2:
            raise RuntimeError("rank 1 fails on purpose")

    try:
        with replay:
            metrics = train_model(model, tokenizer, objective, pairs, votes, config, progress,
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
