"""The gate's greedy answers two ways: transformers' ``generate`` (every row stays in the
batch until the last one ends, what the gate used before) and ``tuning.generation``'s own
loop (a row leaves when its answer ends; a step's grouped-query attention copies no keys or
values). Prints the seconds of each and how many answers
are the same, for a LoRA kept apart (as the gate and vLLM run a version) and for the base.

    .venv/bin/python bench/answering_bench.py [--tokens 256] [--dtype float32]

The prompts: the 52 regression prompts as asked and the first 32 with "Explain in detail."
(long answers), in one batch of the gate's size (``GateConfig.answer_batch_size``), a
rank-16 LoRA on every linear layer with random B (std 0.02), the server's frequency
penalty. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate_answers(model, tok, convs, tokens: int, batch_size: int, penalty: float, adapter_off: bool):
    """The gate's answers as they were made before (transformers' ``generate``)."""
    import torch
    from transformers import LogitsProcessorList

    from assistant.penalties import FrequencyPenalty
    from tuning.generation import stop_ids

    tok.padding_side = "left"
    stop, out = stop_ids(model, tok), []
    with torch.inference_mode(), model.disable_adapter() if adapter_off else nullcontext():
        for i in range(0, len(convs), batch_size):
            enc = tok.apply_chat_template(convs[i : i + batch_size], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True, padding=True)
            start = enc["input_ids"].shape[1]
            gen = model.generate(**enc, max_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop),
                                 logits_processor=LogitsProcessorList([FrequencyPenalty(penalty, start)]))
            for row in gen[:, start:].tolist():
                ids = row[: min((row.index(t) for t in stop if t in row), default=len(row))]
                out.append((tok.decode(ids, skip_special_tokens=True).strip(), len(ids)))
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()
    from transformers import AutoTokenizer

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import cpu_info, describe_cpu
    from tuning.gate import GateConfig
    from tuning.generation import greedy_answers

    from merged_answers import random_lora  # noqa: E402 (bench/ is on the path as the script's folder)

    folder = prepare_embedded_model(a.models_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    model = random_lora(folder, 16, 0.02, a.dtype).eval()
    gate = GateConfig()
    convs = ([[{"role": "user", "content": g.prompt + " Explain in detail."}] for g in gate.golden[:32]]
             + [[{"role": "user", "content": g.prompt}] for g in gate.golden])
    kw = dict(batch_size=gate.answer_batch_size)
    rows = []
    for adapter_off in (False, True):
        t0 = time.monotonic()
        before = generate_answers(model, tok, convs, a.tokens, gate.answer_batch_size, gate.frequency_penalty, adapter_off)
        t1 = time.monotonic()
        now = greedy_answers(model, tok, convs, max_new_tokens=a.tokens, frequency_penalty=gate.frequency_penalty,
                             adapter_off=adapter_off, **kw)
        t2 = time.monotonic()
        rows.append(f"{'base' if adapter_off else 'LoRA kept apart'}: generate {t1 - t0:.1f} s, our loop "
                    f"{t2 - t1:.1f} s ({(t2 - t1) / (t1 - t0):.2f}x), the same answers "
                    f"{sum(x == y for x, y in zip(before, now))}/{len(convs)}, {sum(n for _, n in now)} answer tokens")
    print(f"{time.strftime('%Y-%m-%d')}, {describe_cpu(*cpu_info())}, {a.dtype}, {len(convs)} prompts up to "
          f"{a.tokens} tokens in batches of {gate.answer_batch_size}: " + "; ".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
