"""How stable is each regression-set answer? The gate refuses a version that lost answers
the live version had right; an answer the base only just gets right flips under any
change of weights, trained or not, and then refuses good versions for nothing.

    .venv/bin/python bench/regression_stability.py --adapter DIR   # scale taken from a trained adapter
    .venv/bin/python bench/regression_stability.py --scale 0.02 0.04 --seeds 6

Each perturbed copy of the base adds a random rank-16 update B @ A to every attention and
MLP projection (the shape a LoRA adapter has), scaled so that its norm is ``scale`` times
the weight's. It answers the regression set and FRAGILE, the 63 prompts the set was
chosen from (tuning.gate). ``--adapter``: also print the median of that ratio in a trained adapter, to
choose the scale from. Every regression prompt is then answered greedily as the gate
answers (float32, the served frequency penalty, 64 tokens) and checked for its expected
words. Prints one table: per prompt, the copies (of --seeds) that still answer right at
each scale. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_ratio(model, adapter_dir: Path) -> float:
    """Median over adapted projections of ||scale * B @ A|| / ||W|| in a trained adapter."""
    import json
    import statistics

    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    weights = dict(model.named_parameters())
    ratios = []
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        base = name.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
        w = weights.get(base)
        if w is not None:
            ratios.append(float(torch.linalg.norm(scale * (b.float() @ a.float())) / torch.linalg.norm(w)))
    return statistics.median(ratios)


def perturb(model, scale: float, seed: int, rank: int = 16) -> dict:
    """Add a random rank-``rank`` update of relative norm ``scale`` to every projection;
    returns the originals, to put back."""
    import torch

    g = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and any(f".{proj}." in name for proj in PROJECTIONS):
                out_f, in_f = p.shape
                delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
                saved[name] = p.detach().clone()
                p.add_(delta * (scale * torch.linalg.norm(p) / torch.linalg.norm(delta)))
    return saved


def restore(model, saved: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--adapter", type=Path, help="a trained adapter folder: print its update's relative norm")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.model_files import prepare_embedded_model
    from tuning.gate import FRAGILE, REGRESSION, GateConfig, golden_passes
    from tuning.generation import greedy_answers

    model_dir = prepare_embedded_model(a.models_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = GateConfig()
    chosen_from = chosen_from + FRAGILE  # the 63 prompts the set was chosen from
    convs = [[{"role": "user", "content": g.prompt}] for g in chosen_from]

    def answer(m) -> list[str]:
        return [ans for ans, _ in greedy_answers(m, tok, convs, max_new_tokens=cfg.max_new_tokens,
                                                 batch_size=cfg.batch_size * 2, frequency_penalty=cfg.frequency_penalty)]

    def right(answers: list[str]) -> list[bool]:
        return [golden_passes(ans, g) for ans, g in zip(answers, chosen_from)]

    start = time.monotonic()
    said = answer(model)
    base = right(said)
    if a.adapter:  # how far a trained version moved: the scale to compare the copies with
        from peft import PeftModel

        peft = PeftModel.from_pretrained(model, a.adapter)
        trained = answer(peft)
        model = peft.unload()  # the base again, without the adapter's layers
        print(f"trained adapter {a.adapter.name}: median ||update|| / ||W|| = {adapter_ratio(model, a.adapter):.4f}; "
              f"{sum(x != y for x, y in zip(trained, said))}/{len(said)} answers changed, "
              f"{sum(right(trained))}/{len(said)} right", flush=True)
    kept = {s: [0] * len(chosen_from) for s in a.scale}
    for s in a.scale:
        changed = 0
        for seed in range(a.seeds):
            saved = perturb(model, s, seed)
            now = answer(model)
            changed += sum(x != y for x, y in zip(now, said))
            for i, ok in enumerate(right(now)):
                kept[s][i] += ok
            restore(model, saved)
        print(f"scale {s}: {changed / a.seeds:.1f}/{len(said)} answers changed per copy; "
              f"{sum(k == a.seeds for k in kept[s])}/{len(chosen_from)} prompts right in all "
              f"{a.seeds} copies ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}; base {model_dir.name} in float32, greedy with frequency penalty "
          f"{cfg.frequency_penalty}, {cfg.max_new_tokens} tokens; {a.seeds} random rank-16 updates per scale")
    print("| prompt | base | " + " | ".join(f"right at {s}" for s in a.scale) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in a.scale) + " |")
    for i, g in enumerate(chosen_from):
        if any(kept[s][i] < a.seeds for s in a.scale) or not base[i]:
            print(f"| {g.prompt} | {'right' if base[i] else 'WRONG'} | "
                  + " | ".join(f"{kept[s][i]}/{a.seeds}" for s in a.scale) + " |")
    print(f"(the other {sum(all(kept[s][i] == a.seeds for s in a.scale) and base[i] for i in range(len(chosen_from)))} "
          "prompts: right in every copy at every scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
