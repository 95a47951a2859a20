"""Our CPU LoRA ops against vLLM's own, and the mixed-batch bug they fix."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.ops.torch_ops import lora_ops as upstream  # noqa: E402

from assistant import vllm_lora_ops as ours  # noqa: E402

LORAS, RANK, HIDDEN, OUT = 3, 8, 32, 48


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(LORAS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(LORAS, 1, OUT, RANK, generator=g)
    return a, b


def both(fn, *args, out_shape, **kw):
    """Run upstream's and our ``fn`` on the same inputs into equal starting outputs."""
    start = torch.randn(*out_shape, generator=torch.Generator().manual_seed(1))
    mine, theirs = start.clone(), start.clone()
    getattr(upstream, fn)(*args[:2], theirs, *args[2:], **kw)
    getattr(ours, fn)(*args[:2], mine, *args[2:], **kw)
    return mine, theirs


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0], [0, 1, 1, 2, 0], [2, 2, 1, 1, 1]])
def test_same_results_as_vllms_ops_when_every_token_has_an_adapter(weights, indices):
    a, b = weights
    idx = torch.tensor(indices)
    x = torch.randn(5, HIDDEN)
    h = torch.randn(5, RANK)
    for mine, theirs in [
        both("bgmv_shrink", x, a, idx, 0.5, out_shape=(5, RANK)),
        both("bgmv_expand", h, b, idx, True, out_shape=(5, OUT)),
        both("bgmv_expand", h, b, idx, False, out_shape=(5, OUT)),
        both("bgmv_expand_slice", h, b, idx, 4, OUT, True, out_shape=(5, OUT + 8)),
    ]:
        torch.testing.assert_close(mine, theirs)


def test_sequences_expand_to_their_tokens(weights):
    a, b = weights
    starts, lens, loras = torch.tensor([0, 2]), torch.tensor([2, 3]), torch.tensor([1, 0])
    x, h = torch.randn(5, HIDDEN), torch.randn(5, RANK)
    meta = (starts, lens, loras, 2, 3, 5)
    for mine, theirs in [
        both("sgmv_shrink", x, a, *meta, 2.0, out_shape=(5, RANK)),
        both("sgmv_expand", h, b, *meta, True, out_shape=(5, OUT)),
        both("sgmv_expand_slice", h, b, *meta, 0, OUT, False, out_shape=(5, OUT)),
    ]:
        torch.testing.assert_close(mine, theirs)


def test_a_token_without_an_adapter_gets_none_where_vllm_applies_the_last_one(weights):
    a, b = weights
    idx = torch.tensor([0, -1, 2, -1])
    h = torch.randn(4, RANK)
    mine, theirs = both("bgmv_expand", h, b, idx, True, out_shape=(4, OUT))
    start = torch.randn(4, OUT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mine[[1, 3]], start[[1, 3]])  # base-model tokens untouched
    torch.testing.assert_close(theirs[[1, 3]], start[[1, 3]] + h[[1, 3]] @ b[-1, 0].T)  # the upstream bug
    torch.testing.assert_close(mine[[0, 2]], theirs[[0, 2]])
    shrunk, _ = both("bgmv_shrink", torch.randn(4, HIDDEN), a, idx, 1.0, out_shape=(4, RANK))
    assert torch.count_nonzero(shrunk[[1, 3]]) == 0


def test_the_plugin_replaces_the_ops_the_cpu_wrapper_calls():
    from vllm.lora.punica_wrapper import punica_cpu

    ours.register()
    ours.register()  # vLLM may load a plugin more than once
    assert punica_cpu.bgmv_expand is ours.bgmv_expand and punica_cpu.sgmv_shrink is ours.sgmv_shrink
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is ours.add_lora_linear
    assert ours._UPSTREAM["add_lora_linear"] is not ours.add_lora_linear


# -- the wrapper-level op: all slices of a layer at once, adapters grouped once per step ------

SLICES = (48, 16, 16)  # a fused q/k/v projection: three LoRA slices in one layer


def _wrapper(index_mapping, slot_ids=(1, 2, 3, None), prefill=False):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    ours.register()
    w = PunicaWrapperCPU(64, 8, "cpu")
    w.update_metadata(LoRAMapping(index_mapping=tuple(index_mapping), prompt_mapping=tuple(index_mapping),
                                  is_prefill=prefill), list(slot_ids), 4, 100)
    return w


def _layer(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(4, 1, RANK, HIDDEN, generator=g).to(dtype) for _ in SLICES)
    b = tuple(torch.randn(4, 1, n, RANK, generator=g).to(dtype) for n in SLICES)
    return a, b


def _apply(fn, w, x, a, b, start):
    y = start.clone()
    fn(w, y, x, a, b, 0.5, SLICES)
    return y


@pytest.mark.parametrize("ids", [[1, 1, 1, 1, 1], [1, 2, 2, 3, 1], [2, 0, 3, 0, 0], [0, 0, 0]])
@pytest.mark.parametrize("prefill", [False, True])
def test_add_lora_linear_matches_vllms_per_slice_ops_and_leaves_base_tokens_alone(ids, prefill):
    """Lora ids as vLLM maps them (0: no adapter); vLLM's own wrapper method is the reference,
    run on our grouped per-op kernels (its per-token ones have the base-token bug)."""
    w = _wrapper(ids, prefill=prefill)
    a, b = _layer()
    x = torch.randn(len(ids), HIDDEN)
    start = torch.randn(len(ids), sum(SLICES))
    mine = _apply(ours.add_lora_linear, w, x, a, b, start)
    theirs = _apply(ours._UPSTREAM["add_lora_linear"], w, x, a, b, start)
    torch.testing.assert_close(mine, theirs)
    base_rows = [i for i, lid in enumerate(ids) if lid == 0]
    torch.testing.assert_close(mine[base_rows], start[base_rows], rtol=0, atol=0)
    if len(base_rows) < len(ids):
        assert not torch.allclose(mine, start)


def test_add_lora_linear_in_bfloat16_matches_vllm():
    w = _wrapper([1, 2, 1, 0])
    a, b = _layer(dtype=torch.bfloat16)
    x, start = torch.randn(4, HIDDEN, dtype=torch.bfloat16), torch.randn(4, sum(SLICES), dtype=torch.bfloat16)
    torch.testing.assert_close(_apply(ours.add_lora_linear, w, x, a, b, start),
                               _apply(ours._UPSTREAM["add_lora_linear"], w, x, a, b, start))


def test_cached_fused_weights_follow_the_adapter_a_slot_holds():
    """vLLM reuses a slot for another adapter: the next step must use the new weights."""
    a, b = _layer(seed=1)
    x, start = torch.randn(2, HIDDEN), torch.zeros(2, sum(SLICES))
    w = _wrapper([1, 1])
    first = _apply(ours.add_lora_linear, w, x, a, b, start)
    new_a, new_b = _layer(seed=2)
    for t, n in zip(a + b, new_a + new_b):
        t[0] = n[0]  # slot 0 now holds another adapter, id 7
    ours.update_metadata(w, _mapping([7, 7]), [7, 2, 3, None], 4, 100)
    second = _apply(ours.add_lora_linear, w, x, a, b, start)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _apply(ours._UPSTREAM["add_lora_linear"], w, x, a, b, start))


def _mapping(ids):
    from vllm.lora.layers import LoRAMapping

    return LoRAMapping(index_mapping=tuple(ids), prompt_mapping=tuple(ids), is_prefill=False)


def test_a_step_without_adapters_costs_no_lora_work():
    w = _wrapper([0, 0, 0])
    assert w._assistant_groups == (3, [])
    a, b = _layer()
    x, start = torch.randn(3, HIDDEN), torch.randn(3, sum(SLICES))
    torch.testing.assert_close(_apply(ours.add_lora_linear, w, x, a, b, start), start, rtol=0, atol=0)


# -- how the app learns that a server runs these ops ---------------------------------------

LOG = """assistant: CPU LoRA ops replaced (grouped matmuls) in pid 100
(APIServer pid=100) INFO ... version 0.32.0
assistant: CPU LoRA ops replaced (grouped matmuls) in pid 200
(EngineCore pid=200) INFO ... Initializing a V1 LLM engine
assistant: CPU LoRA ops replaced (grouped matmuls) in pid 300
(Worker pid=300) INFO ... Loading weights
"""


def test_base_requests_skip_lora_only_when_every_process_running_the_model_logged_our_ops():
    from assistant.vllm_server import model_processes_run_our_lora_ops as fixed

    assert fixed(LOG)
    assert fixed(LOG.replace("(Worker pid=300)", "(Worker_TP0 pid=300)"))
    assert not fixed(LOG.replace("in pid 300", "in pid 999"))  # the worker, where the model runs, lacks them
    assert not fixed(LOG.replace("in pid 200", "in pid 999"))  # the engine core lacks them
    assert not fixed("\n".join(line for line in LOG.splitlines() if "replaced" not in line))  # another vLLM
    assert not fixed("assistant: CPU LoRA ops replaced (grouped matmuls) in pid 100\n")  # no model process seen
