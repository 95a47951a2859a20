"""Batched greedy answers for evaluation and for building on-policy data.

Greedy (no sampling) so that a version's answers are a fixed function of its weights: the
gate compares versions, not luck. Prompts are left-padded and answered in batches (5x the
tokens/s of one at a time on two cores); a row leaves its batch when its answer ends
(``_greedy_batch``). In float32, which the gate uses, batching changes
no answer: 65 of 65 regression prompts gave the same greedy answer batched by 16 and
alone, for the base and for a trained adapter. In bfloat16 it does (6 of 65 differed,
even in batches of prompts of equal length), so callers that compare answers token for
token generate in float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from assistant.penalties import FrequencyPenalty

GROUPED_DECODE = "sdpa_grouped_decode"


def _grouped_decode_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa, except a one-token step of grouped-query attention: there sdpa
    copies each key and value head once per query head that reads it (its ``repeat_kv``,
    whenever a padding mask is given), every step, over the whole cache. Here the query
    heads that share a key-value head are put side by side as that head's queries instead,
    the same products without the copies: at a cache of 300 tokens a step of 32 answers
    took 306 ms against 468 (SmolLM2-135M, 9 query and 3 key-value heads, float32, AVX2)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, heads // groups, groups, dim), key, value, attn_mask=attention_mask,
        scale=kwargs.get("scaling"))
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_DECODE, _grouped_decode_sdpa)
AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)


def greedy_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    adapter_off: bool = False,
    frequency_penalty: float = 0.0,
    cache: AnswerCache | None = None,
) -> list[tuple[str, int]]:
    """(answer text, answer tokens) for each conversation; ``adapter_off`` answers as the base;
    ``frequency_penalty`` as the server applies it (``assistant.penalties``). With ``cache``
    (the answering model's, see ``AnswerCache``) and the model in float32, answers it holds
    are read and only the others are generated, then kept."""
    if cache is not None and next(model.parameters()).dtype == torch.float32:
        return cache.answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             adapter_off=adapter_off, frequency_penalty=frequency_penalty)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop = stop_ids(model, tokenizer)
    out: list[tuple[str, int]] = []
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), ctx, _grouped_decode(model):
            for i in range(0, len(conversations), batch_size):
                enc = tokenizer.apply_chat_template(
                    conversations[i : i + batch_size], add_generation_prompt=True,
                    return_tensors="pt", return_dict=True, padding=True,
                )
                for ids in _greedy_batch(model, enc, max_new_tokens, stop, frequency_penalty):
                    out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


@contextmanager
def _grouped_decode(model):
    """The model answers through ``_grouped_decode_sdpa`` where it runs sdpa, then back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        yield
        return
    base.set_attn_implementation(GROUPED_DECODE)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's end-of-sequence ids (what
    vLLM stops at) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _greedy_batch(model, enc, max_new_tokens: int, stop: set[int], frequency_penalty: float) -> list[list[int]]:
    """Each left-padded row's greedy answer tokens, the stopping token left out.

    transformers' ``generate`` keeps a finished row in the batch until the last row ends,
    and every step then attends over all of them; this loop drops a row from the batch and
    its key-value cache as soon as it ends, with the same answers (float32 greedy does not
    depend on the batch: module docstring). It saves only where answers end before the
    limit: 84 prompts up to 256 tokens, about 87 on average, took 96.7 s against 241.4,
    while a job whose answers all ran to 256 tokens saved nothing. The frequency penalty
    is the server's (``assistant.penalties``); every row still in the batch has produced
    the same number of tokens, so they are one tensor."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    if max_new_tokens <= 0:
        return answers
    rows = list(range(ids.shape[0]))  # which answer each row of the batch is
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    position = position[:, -1:]
    penalty = FrequencyPenalty(frequency_penalty, 0)
    produced = ids.new_empty(ids.shape[0], 0)  # each row's answer so far
    while True:
        chosen = penalty(produced, logits).argmax(-1)
        keep = []
        for j, token in enumerate(chosen.tolist()):
            if token in stop:
                continue
            answers[rows[j]].append(token)
            if len(answers[rows[j]]) < max_new_tokens:
                keep.append(j)
        if not keep:
            return answers
        if len(keep) < len(rows):
            kept = torch.tensor(keep, device=device)
            cache.batch_select_indices(kept)
            rows = [rows[j] for j in keep]
            chosen, mask, position, produced = chosen[kept], mask[kept], position[kept], produced[kept]
        produced = torch.cat([produced, chosen[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()


@dataclass(frozen=True)
class AnswerCache:
    """A fixed model's greedy float32 answers, kept by prompt: the gate answers the same
    regression questions with the same live version at every job until a new one is
    promoted; the second job on reads them (on a 2-core CPU without fast kernels, a few
    minutes a job). Valid because float32 greedy answers do not depend on the batch (above).
    The regression set's answers are kept beside the models; the live version's answers to
    the held-out users' prompts in the data folder (``only_asked``: the file holds the
    prompts of the last gate or preparation and nothing else, so a prompt whose
    conversation was withdrawn leaves it at the next one); data sets' questions are not kept.

    ``folder``: where the answers are kept (the regression set's beside the prepared base
    models, shared by every data folder using them; users' prompts' in the data folder). ``model``: what the answering model is, e.g. its base files
    (``tuning.sft.starting_point``) and the live version's content hash; a file per model,
    token limit and frequency penalty, a prompt per entry."""

    folder: Path
    model: dict
    only_asked: bool = False  # the file then holds the last call's prompts only (users' prompts)

    def file(self, max_new_tokens: int, frequency_penalty: float) -> Path:
        key = json.dumps({"model": self.model, "max_new_tokens": max_new_tokens, "code": answering_code(),
                          "frequency_penalty": frequency_penalty}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def answers(self, model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                frequency_penalty: float, **kw) -> list[tuple[str, int]]:
        path = self.file(max_new_tokens, frequency_penalty)
        stored = self._read(path)
        keys = [_conversation_key(c) for c in conversations]
        missing = {k: c for k, c in zip(keys, conversations) if k not in stored}
        if missing:
            got = greedy_answers(model, tokenizer, list(missing.values()), max_new_tokens=max_new_tokens,
                                 frequency_penalty=frequency_penalty, **kw)
            stored.update({k: [text, n] for k, (text, n) in zip(missing, got)})
        asked = set(keys)
        if self.only_asked and stored.keys() != asked:
            stored = {k: v for k, v in stored.items() if k in asked}
            keep(path, stored)
        elif missing:
            keep(path, stored)
        return [tuple(stored[k]) for k in keys]

    def _read(self, path: Path) -> dict:
        stored = read_kept(path, lambda d: isinstance(d, dict) and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int) for v in d.values()))
        return stored if stored is not None else {}


def code_version(*files: str | Path) -> str:
    """What else decides a kept answer or score: these source files' hash, torch's and
    transformers' versions. An upgrade that changes how they are made makes them again."""
    import transformers

    h = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files))
    return f"{h.hexdigest()[:16]} torch {torch.__version__} transformers {transformers.__version__}"


@functools.cache  # read once a process: the sources do not change under it
def answering_code() -> str:
    """What else decides a kept answer: this file and the penalty's source (``code_version``)."""
    from assistant import penalties

    return code_version(__file__, penalties.__file__)


def read_kept(path: Path, valid) -> object | None:
    """The JSON kept at ``path`` when ``valid(it)``, else None (absent, or damaged: said, then answered again)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    if data is not None and valid(data):
        return data
    print(f"kept answers in {path} are not readable; answering again", flush=True)
    return None


def read_tensors(path: Path, valid, again: str) -> dict | None:
    """The tensors kept at ``path`` (safetensors: tensors only, nothing a planted file could
    run) when ``valid(them)``, else None: absent, or damaged or not what is expected (said,
    with what happens ``again``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = load_file(path)
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError, ValueError):
        data = None
    if data is not None and valid(data):
        return data
    print(f"kept reference in {path} is not readable; {again}", flush=True)
    return None


def _write_whole(path: Path, write, failed: str) -> None:
    """``write(tmp)`` next to ``path``, then renamed over it (a reader sees the old file or
    none); a folder that cannot be written only costs the reuse (``failed``, said)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write(tmp)
        tmp.replace(path)
    except OSError as e:
        print(failed.format(error=e), flush=True)


def keep(path: Path, data, failed: str = "answers not kept ({error}); the next job answers them again") -> None:
    """Write ``data`` as JSON at ``path``, whole (``_write_whole``; ``failed``: what a
    folder that cannot be written costs, said)."""
    _write_whole(path, lambda tmp: tmp.write_text(json.dumps(data)), failed)


def keep_tensors(path: Path, tensors: dict, again: str) -> None:
    """Write ``tensors`` as safetensors at ``path``, whole (``_write_whole``)."""
    from safetensors.torch import save_file

    _write_whole(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp),
                 f"reference not kept ({{error}}); the next job {again}")


def _conversation_key(conversation: list[dict]) -> str:
    return json.dumps([(m.get("role"), m.get("content")) for m in conversation])
