"""The gate's answers through a LoRA kept apart (as vLLM serves it) or merged into the
weights: seconds for the regression set, and whether the greedy answers are the same.

    .venv/bin/python bench/merged_answers.py [--tokens 64] [--rank 16]

A rank-16 LoRA on every linear layer with small random B (what a trained one costs to run;
its values do not change the speed) on the embedded model in float32, the gate's batch and
frequency penalty. Prints one line. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def random_lora(folder: Path, rank: int, std: float, dtype: str = "float32"):
    """The model in ``folder`` with a rank-``rank`` LoRA on every linear layer whose B is
    drawn with standard deviation ``std`` (peft starts it at zero: it would change nothing),
    the same every run: what a trained version costs to run, for the answering benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()
    from transformers import AutoTokenizer

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import cpu_info, describe_cpu
    from tuning.gate import GateConfig
    from tuning.generation import greedy_answers

    folder = prepare_embedded_model(a.models_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    model = random_lora(folder, a.rank, 0.002)
    gate = GateConfig()
    convs = [[{"role": "user", "content": g.prompt}] for g in gate.golden]
    kw = dict(max_new_tokens=a.tokens, batch_size=gate.answer_batch_size, frequency_penalty=gate.frequency_penalty)
    t0 = time.monotonic()
    apart = greedy_answers(model, tok, convs, **kw)
    t1 = time.monotonic()
    model.merge_adapter()
    merged = greedy_answers(model, tok, convs, **kw)
    t2 = time.monotonic()
    model.unmerge_adapter()
    print(f"{time.strftime('%Y-%m-%d')}, {describe_cpu(*cpu_info())}, float32: {len(convs)} regression answers of up to "
          f"{a.tokens} tokens through a rank-{a.rank} LoRA kept apart {t1 - t0:.1f} s, merged {t2 - t1:.1f} s; "
          f"the same answers {sum(x == y for x, y in zip(apart, merged))}/{len(convs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
