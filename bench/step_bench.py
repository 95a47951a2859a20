"""Benchmark: seconds per training step with each of the step's savings on or off, side by side.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python bench/step_bench.py            # about 6 minutes on 2 cores

A feedback job's step is a DPO batch of 4 pairs and 4 replayed answers (``TrainConfig``
defaults), each forward and backward. Three savings make it compute less for the same
numbers (``tests/test_dpo.py``): the prefix every row shares runs once
(``tuning.dpo.shared_prefix``), rows run in groups of similar length instead of all padded
to the longest (``row_groups``), and a rejected answer stops after its last marked token
(``tokenize_pair``), and a rejected answer whose context is its chosen answer's start (an
added closing) is read from the chosen row instead of run (``covering_rows``). Each is
switched off here one at a time, and all together, on the same steps, in rounds (the
machine's load drifts, so compare within a round): pairs of three kinds a user teaches,
an added opening (the rejected answer's first token is its last marked one), a shortened
answer (the rejected answer is the longer) and an added closing, on the embedded
model's own answers to the replayed questions, with the replayed rows beside them. Prints
the CPU and format with the table. Documented, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = ["all on", "no shared prefix", "no length groups", "rejected not cut", "covered row runs", "all off"]


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="steps per setting and round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()

    import torch

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import machine_format
    from tuning import dpo, sft
    from tuning.config import TrainConfig
    from tuning.synthetic import first_sentence
    from tuning.trainer import build_model

    fmt = machine_format(a.dtype)
    config = TrainConfig(dtype=fmt.dtype)
    model_dir = prepare_embedded_model(a.models_dir)
    model, tok = build_model(model_dir, config)
    autocast = fmt.dtype == "bfloat16"
    steps = a.steps + 1
    # The model's own answers to the questions a job replays: the shown answers of both kinds
    # and the replayed rows (what the app keeps in <models>/.replay).
    t0 = time.monotonic()
    rows = sft.replay_rows(model, tok, 8 * steps)
    print(f"{len(rows)} answers in {time.monotonic() - t0:.0f} s", flush=True)
    shown, replayed = rows[: 4 * steps], rows[4 * steps : 8 * steps]
    pad = dpo.pad_id(tok)
    kinds = {
        "opening": [{"prompt": r["messages"][:1], "chosen": [{"role": "assistant", "content": "Thanks for asking! " + r["messages"][1]["content"]}],
                     "rejected": r["messages"][1:]} for r in shown],
        "shorter": [{"prompt": r["messages"][:1], "chosen": [{"role": "assistant", "content": first_sentence(r["messages"][1]["content"])}],
                     "rejected": r["messages"][1:]} for r in shown],
        "closing": [{"prompt": r["messages"][:1], "chosen": [{"role": "assistant", "content": r["messages"][1]["content"] + " I hope this helps!"}],
                     "rejected": r["messages"][1:]} for r in shown],
    }
    replay = sft.with_replay_reference(model, [sft.tokenize_example(tok, r, config.max_length) for r in replayed], pad, autocast)
    loop = sft.Replay(replay, config.replay_per_step, config.replay_weight, pad, autocast)

    def uncut(items: list, pairs: list[dict]) -> list:
        """The items with their whole rejected answers, unmarked past the cut (the same loss)."""
        out = []
        for it, p in zip(items, pairs):
            whole = dpo.tokenize_pair(tok, p, config.max_length).rejected
            chosen_marks, marks = it.dpo
            out.append(dataclasses.replace(it, rejected=whole, dpo=(chosen_marks, marks + (0,) * (len(whole) - len(marks)))))
        return out

    items = {k: dpo.with_reference(model, dpo.pair_items(tok, v, config), pad, autocast) for k, v in kinds.items()}
    whole = {k: uncut(items[k], kinds[k]) for k in kinds}
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate)
    model.train()
    times: dict = {(k, s): [] for k in kinds for s in SETTINGS}
    covering = dpo.covering_rows
    for rnd in range(a.rounds):
        for kind in kinds:
            for setting in SETTINGS:
                dpo.SHARED_PREFIX_MIN = 10**9 if setting in ("no shared prefix", "all off") else 8
                dpo.PASS_TOKENS = 10**9 if setting in ("no length groups", "all off") else 48
                dpo.covering_rows = (lambda *a: {}) if setting in ("covered row runs", "all off") else covering
                pairs = whole[kind] if setting in ("rejected not cut", "all off") else items[kind]
                seconds = []
                for s in range(steps):
                    t = time.monotonic()
                    opt.zero_grad(set_to_none=True)
                    loss, _ = dpo.pair_loss(model, dpo.collate(pairs[4 * s : 4 * s + 4], pad), config.beta,
                                            config.nll_weight, autocast, config.nll_tokens, config.unlike_kept_starts)
                    loss.backward()
                    (loop.loss(model, replay[4 * s : 4 * s + 4]) * loop.weight).backward()
                    opt.step()
                    seconds.append(time.monotonic() - t)
                times[(kind, setting)].append(statistics.mean(seconds[1:]))
                print(f"round {rnd + 1} {kind:8s} {setting:18s} {times[(kind, setting)][-1]:.2f} s/step", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}; {fmt.describe()}; {torch.get_num_threads()} threads; one step = 4 pairs "
          f"and {config.replay_per_step} replayed answers, forward and backward; s/step per round")
    print("| setting | " + " | ".join(f"{k} s/step" for k in kinds) + " | " + " | ".join(f"{k} vs all off" for k in kinds) + " |")
    print("| --- |" + " ---: |" * (2 * len(kinds)))
    for setting in SETTINGS:
        cells = [" / ".join(f"{x:.2f}" for x in times[(k, setting)]) for k in kinds]
        ratios = [f"{statistics.mean(times[(k, setting)]) / statistics.mean(times[(k, 'all off')]):.2f}x" for k in kinds]
        print(f"| {setting} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
