"""The frequency penalty as vLLM applies it: the answer's own tokens, counted, never the prompt's."""

import torch

from assistant.penalties import FrequencyPenalty


def test_each_earlier_answer_token_costs_the_penalty_times_its_count_and_the_prompt_costs_nothing():
    ids = torch.tensor([[5, 5, 7, 1, 1, 2], [0, 5, 7, 3, 3, 3]])  # prompt: the first 3 columns
    scores = torch.zeros(2, 8)
    out = FrequencyPenalty(0.5, prompt_len=3)(ids, scores.clone())
    assert out[0].tolist() == [0, -1.0, -0.5, 0, 0, 0, 0, 0]  # token 1 twice, token 2 once; 5 and 7 only in the prompt
    assert out[1].tolist() == [0, 0, 0, -1.5, 0, 0, 0, 0]
    assert torch.equal(FrequencyPenalty(0.0, 3)(ids, scores.clone()), scores)
    assert torch.equal(FrequencyPenalty(0.5, 6)(ids, scores.clone()), scores)  # nothing generated yet


def test_a_big_penalty_forbids_any_answer_token_twice_in_a_padded_batch():
    from tiny import tiny_model, tiny_tokenizer
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    tok.padding_side = "left"
    enc = tok.apply_chat_template([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer one"}]],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    start = enc["input_ids"].shape[1]
    args = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.inference_mode():
        plain = model.generate(**enc, **args)[:, start:]
        penalised = model.generate(**enc, **args, logits_processor=LogitsProcessorList([FrequencyPenalty(1e4, start)]))[:, start:]
    assert any(len(set(row.tolist())) < len(row) for row in plain)  # the untrained model repeats
    assert all(len(set(row.tolist())) == len(row) for row in penalised)
