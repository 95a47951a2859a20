"""Write plain LoRA adapter folders without training: the all-zero "base" adapter, test adapters.

When the base model is served as an adapter: on vLLM's CPU backend without the app's LoRA
ops, a request with no adapter that shares a batch with LoRA requests gets the last loaded
adapter applied (upstream vllm PR #48421, seen here: 11 of 36 base answers in a mixed batch
came out of another adapter). A LoRA whose B matrices are zero adds exactly nothing, so the
base model answered through it is the base model, and every request then carries an
adapter, which vLLM routes correctly (0 wrong of 36 in the same run). It costs the LoRA
path's speed on base requests, so the app uses it only where it cannot know that the
server runs ``assistant.vllm_lora_ops`` (a server given with ``--vllm-url``, or one whose
log lacks the plugin's line: ``vllm_engine.open_vllm_engine``). The folder is written once,
validated like any other adapter, and named ``base-{hash12}`` (never a version name).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .adapters import CONFIG, WEIGHTS, base_weight_shapes, content_hash, validate_adapter
from .engine import Adapter

# q_proj alone: the smallest adapter that still sends the request down the LoRA path.
BASE_TARGETS = ("q_proj",)


def write_lora(
    folder: Path,
    model_dir: Path,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = BASE_TARGETS,
    b_scale: float = 0.0,
    seed: int = 0,
) -> Path:
    """A peft-format LoRA for ``model_dir``: A ~ N(0, 1/rank), B ~ N(0, b_scale) (0: all zeros)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(base_weight_shapes(model_dir).items()):
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets or len(shape) != 2:
            continue
        out_f, in_f = shape
        a = torch.randn(rank, in_f, generator=gen) / rank
        b = torch.randn(out_f, rank, generator=gen) * b_scale
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise ValueError(f"{model_dir} has no modules named {targets}")
    save_file(tensors, folder / WEIGHTS)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(targets), "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
        "base_model_name_or_path": str(model_dir),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def base_adapter(model_dir: Path, adapters_dir: Path, max_rank: int) -> Adapter:
    """The all-zero adapter that stands for the base model; created on first use."""
    folder = Path(adapters_dir) / f"base-zero-{Path(model_dir).name}"
    if not (folder / WEIGHTS).is_file():
        # App replicas sharing one adapters folder start together: each writes a folder of
        # its own and the first rename wins (the content is the same, seed 0). One shared
        # ".tmp" folder had them write into each other's files and fail the second rename.
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
        try:
            write_lora(tmp, model_dir, rank=1)
            try:
                tmp.rename(folder)
            except OSError:  # another replica's rename came first
                if not (folder / WEIGHTS).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    validate_adapter(folder, base_shapes=base_weight_shapes(model_dir), max_rank=max_rank)
    return Adapter(name=f"base-{content_hash(folder)[:12]}", path=str(folder.resolve()), version=0)
