"""Adapter validation on a tiny in-process model: every refusal names its check."""

import json
import math

import pytest
import torch

from assistant.adapters import (
    InvalidAdapter,
    adapter_name,
    base_model_identity,
    base_weight_shapes,
    content_hash,
    validate_adapter,
)
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tiny")
    base = tiny_model(64)
    base.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    model.save_pretrained(root / "adapter")
    other = tiny_model(64, hidden=48)
    other.save_pretrained(root / "other")
    return root


def _copy(tiny, tmp_path):
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(tiny / "adapter", dst)
    return dst


def test_a_good_adapter_passes_and_has_a_stable_identity(tiny):
    shapes = base_weight_shapes(tiny / "base")
    info = validate_adapter(tiny / "adapter", base_shapes=shapes, max_rank=16)
    assert info.rank == 4 and info.target_modules == ("q_proj", "v_proj") and info.params > 0
    assert info.content_hash == content_hash(tiny / "adapter")
    assert adapter_name(3, info.content_hash) == f"v3-{info.content_hash[:12]}"
    assert base_model_identity(tiny / "base") != base_model_identity(tiny / "other")


def _refused(folder, tiny, check, **kw):
    with pytest.raises(InvalidAdapter) as e:
        validate_adapter(folder, base_shapes=base_weight_shapes(tiny / kw.pop("base", "base")), max_rank=kw.pop("max_rank", 16), **kw)
    assert e.value.check == check, str(e.value)
    return str(e.value)


def test_missing_empty_and_corrupt_files_are_refused(tiny, tmp_path):
    a = _copy(tiny, tmp_path)
    (a / "adapter_model.safetensors").unlink()
    assert "missing" in _refused(a, tiny, "files")
    a = _copy(tiny, tmp_path / "2")
    (a / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    _refused(a, tiny, "weights")
    a = _copy(tiny, tmp_path / "3")
    (a / "adapter_config.json").write_text("{not json")
    _refused(a, tiny, "config")


def test_nan_weights_wrong_rank_other_base_and_changed_content(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    a = _copy(tiny, tmp_path)
    weights = load_file(a / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key][0, 0] = math.nan
    save_file(weights, a / "adapter_model.safetensors")
    assert "NaN" in _refused(a, tiny, "finite")

    _refused(tiny / "adapter", tiny, "rank", max_rank=2)
    assert "this base model needs" in _refused(tiny / "adapter", tiny, "base model", base="other")
    _refused(tiny / "adapter", tiny, "hash", expected_hash="0" * 64)

    a = _copy(tiny, tmp_path / "4")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(a, tiny, "config")
