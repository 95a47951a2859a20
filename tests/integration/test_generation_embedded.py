"""The gate answers many prompts at once (``GateConfig.answer_batch_size``) and keeps the
live version's answers between jobs (``AnswerCache``); both are right only if a greedy
answer in float32 does not depend on what else was in its batch. Checked here on the
embedded SmolLM2-135M with a LoRA adapter whose weights are not zero (so the adapter's path
is in every answer), with the server's frequency penalty, on prompts of different lengths
(so the batch is left-padded): every answer batched as the gate batches equals the same
prompt answered alone.
"""

from __future__ import annotations

import pytest
import torch

from tuning.gate import REGRESSION, GateConfig
from tuning.generation import greedy_answers

pytestmark = pytest.mark.slow

PROMPTS = [g.prompt for g in REGRESSION[::5]] + [
    "Hi",
    "Explain in a few sentences why the sky looks blue during the day but red at sunset, "
    "and what that has to do with the air and the light of the sun.",
]


def test_a_batched_greedy_answer_in_float32_equals_the_same_prompt_answered_alone(embedded_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_model)
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
            torch.nn.init.normal_(p, std=0.02)
    config = GateConfig()
    assert config.answer_batch_size >= len(PROMPTS)  # one batch holds them all, padded
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    kw = dict(max_new_tokens=40, frequency_penalty=config.frequency_penalty)
    batched = greedy_answers(model, tok, convs, batch_size=config.answer_batch_size, **kw)
    alone = [greedy_answers(model, tok, [c], batch_size=1, **kw)[0] for c in convs]
    base = greedy_answers(model, tok, convs, batch_size=config.answer_batch_size, adapter_off=True, **kw)
    changed = sum(x != y for x, y in zip(base, batched))
    print(f"{changed} of {len(PROMPTS)} answers changed by the adapter")
    assert changed >= 3, changed  # the adapter is in the answers
    assert all(n > 0 for _, n in batched)
    for p, b, a in zip(PROMPTS, batched, alone):
        assert b == a, (p, b, a)
