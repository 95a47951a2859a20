"""Greedy answers for evaluation and for building on-policy data, as the server gives them.

Greedy (no sampling) so that a version's answers are a fixed function of its weights: the
gate compares versions, not luck. Prompts are answered in batches of prompts of the same
token length, so no prompt is padded: left padding changed greedy answers in bfloat16
(3 of 16 gate prompts differed from the same prompt asked alone, while the server asks
each prompt unpadded), and equal-length batches gave the answers of one-at-a-time in both
formats (tests/integration/test_dpo_embedded.py checks it on a trained adapter).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def greedy_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    adapter_off: bool = False,
) -> list[tuple[str, int]]:
    """(answer text, answer tokens) for each conversation; ``adapter_off`` answers as the base."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    was_training = model.training
    model.eval()
    # Equal-length batches, each keeping its conversations' positions in ``out``.
    lengths = [len(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for c in conversations]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    batches = [idx[j : j + batch_size] for idx in by_length.values() for j in range(0, len(idx), batch_size)]
    out: list[tuple[str, int] | None] = [None] * len(conversations)
    try:
        with torch.inference_mode(), ctx:
            for batch in batches:
                enc = tokenizer.apply_chat_template(
                    [conversations[i] for i in batch], add_generation_prompt=True,
                    return_tensors="pt", return_dict=True, padding=True,
                )
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                    top_p=None, top_k=None, pad_token_id=pad,
                )
                for i, row in zip(batch, gen[:, enc["input_ids"].shape[1] :]):
                    ids = row.tolist()
                    if tokenizer.eos_token_id in ids:
                        ids = ids[: ids.index(tokenizer.eos_token_id)]
                    out[i] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out  # type: ignore[return-value]
