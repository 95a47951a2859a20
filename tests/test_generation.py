"""tuning.generation.greedy_answers: its own decoding loop, in which an answer leaves the
batch when it ends and a step's grouped-query attention copies no key or value, gives the
answers transformers' ``generate`` gives (which keeps every row to the end and runs sdpa),
with the server's frequency penalty."""

import torch
from tiny import tiny_model, tiny_tokenizer
from transformers import LogitsProcessorList

from assistant.penalties import FrequencyPenalty
from tuning.generation import GROUPED_DECODE, greedy_answers

PENALTY = 3.0  # large enough to change these answers
PROMPTS = ["hi", "a longer one here", "zed", "one two three four five six"]


def generated(model, tok, convs, tokens: int, penalty: float, eos: int | None) -> list[list[int]]:
    """transformers' answers, cut before the first stopping token."""
    tok.padding_side = "left"
    enc = tok.apply_chat_template(convs, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    start = enc["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos, logits_processor=LogitsProcessorList([FrequencyPenalty(penalty, start)]))
    rows = [row.tolist() for row in out[:, start:]]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def test_answers_that_end_early_leave_the_batch_and_every_answer_equals_transformers_generate():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), initializer_range=0.5).eval()
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    # A stopping token that ends some answers early and not others: one the untrained
    # model says at the third step of one answer only.
    free = generated(model, tok, convs, 12, PENALTY, None)
    firsts = {t for row in free for t in row[:2]}
    stop = next(row[2] for row in free if row[2] not in firsts and sum(row[2] in r for r in free) < len(free))
    model.generation_config.eos_token_id = stop
    expected = generated(model, tok, convs, 12, PENALTY, stop)
    assert min(map(len, expected)) < 12 == max(map(len, expected)), expected  # some end early, some run to the limit

    batch_rows, attention = [], set()
    hook = model.register_forward_pre_hook(lambda m, a, kw: batch_rows.append(kw["input_ids"].shape[0])
                                           or attention.add(m.config._attn_implementation), with_kwargs=True)
    got = greedy_answers(model, tok, convs, max_new_tokens=12, batch_size=8, frequency_penalty=PENALTY)
    hook.remove()
    assert [n for _, n in got] == [len(row) for row in expected]
    assert [text for text, _ in got] == [tok.decode(row, skip_special_tokens=True).strip() for row in expected]
    assert batch_rows[0] == len(PROMPTS) and batch_rows[-1] < len(PROMPTS)  # the ended rows stopped running
    assert len(batch_rows) == 12  # the prompt, then one step per token until the longest answer is whole
    # The steps ran through the grouped-query decode (2 query heads per key-value head here), then sdpa is back.
    assert attention == {GROUPED_DECODE} and model.config._attn_implementation == "sdpa"
    # The penalty is the server's: without it the answers are other ones.
    assert greedy_answers(model, tok, convs, max_new_tokens=12, batch_size=8) != got
