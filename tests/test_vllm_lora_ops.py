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
