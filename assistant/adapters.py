"""LoRA adapter folders: identity (name, content hash) and validation before loading.

A version's name is ``v{version}-{hash12}``: derived from its number and its content, so a
new version never reuses a name (reused names serve stale weights in vLLM, #42125).
``validate_adapter`` is called before any engine loads a folder; it refuses, naming the
check that failed, a folder that is incomplete, not LoRA, made for another base model, of
a rank the server cannot hold, with non-finite weights, or whose content changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class InvalidAdapter(ValueError):
    def __init__(self, check: str, detail: str):
        super().__init__(f"adapter refused ({check}): {detail}")
        self.check = check


@dataclass(frozen=True)
class AdapterInfo:
    content_hash: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    params: int


def content_hash(folder: Path) -> str:
    """sha256 over the config and the weights: what the adapter *is*."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def adapter_name(version: int, digest: str) -> str:
    return f"v{version}-{digest[:12]}"


def base_model_identity(model_dir: Path) -> str:
    """Name plus a hash of the model's config and weight shapes (not its path)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name, shape in sorted(base_weight_shapes(model_dir).items()):
        h.update(f"{name}:{shape}".encode())
    return f"{model_dir.name}@{h.hexdigest()[:12]}"


def base_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _base_key(lora_key: str) -> tuple[str, str]:
    """'base_model.model.X.q_proj.lora_A.weight' -> ('X.q_proj.weight', 'A')."""
    key = lora_key.removeprefix("base_model.model.")
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in key:
            module = key.split(marker)[0]
            return f"{module}.weight", part
    raise KeyError(lora_key)


def validate_adapter(
    folder: Path,
    *,
    base_shapes: dict[str, tuple[int, ...]],
    max_rank: int,
    expected_hash: str | None = None,
) -> AdapterInfo:
    """Check a folder before it may be loaded; raise InvalidAdapter naming the failed check."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise InvalidAdapter("files", f"{name} is missing from {folder.name}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapter("config", f"{CONFIG} does not parse: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidAdapter("config", "not a LoRA adapter (peft_type is not LORA)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter("config", f"rank r={rank!r} is not a positive integer")
    if rank > max_rank:
        raise InvalidAdapter("rank", f"rank {rank} exceeds the server's limit of {max_rank}")
    params = 0
    try:
        with safe_open(folder / WEIGHTS, framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise InvalidAdapter("weights", "the weights file holds no tensors")
            for key in keys:
                tensor = f.get_tensor(key)
                params += tensor.numel()
                try:
                    base_key, part = _base_key(key)
                except KeyError:
                    raise InvalidAdapter("base model", f"{key} is not a LoRA weight") from None
                shape = base_shapes.get(base_key)
                if shape is None:
                    raise InvalidAdapter("base model", f"the base model has no {base_key}: made for another model")
                out_features, in_features = shape[0], shape[-1]
                want = (rank, in_features) if part == "A" else (out_features, rank)
                if tuple(tensor.shape) != want:
                    raise InvalidAdapter(
                        "base model",
                        f"{key} has shape {tuple(tensor.shape)}, this base model needs {want}",
                    )
                if not bool(torch.isfinite(tensor.float()).all()):
                    raise InvalidAdapter("finite", f"{key} holds NaN or infinite values")
    except InvalidAdapter:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise InvalidAdapter("weights", f"{WEIGHTS} does not load: {e}") from e
    digest = content_hash(folder)
    if expected_hash is not None and digest != expected_hash:
        raise InvalidAdapter("hash", "the files changed since this version was registered")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    return AdapterInfo(digest, rank, float(config.get("lora_alpha", rank)), tuple(sorted(targets)), params)


def check_name(name: str) -> str:
    """Adapter names come from the registry, never from a path a user typed."""
    import re

    if not re.fullmatch(r"v\d+-[0-9a-f]{12}", name):
        raise InvalidAdapter("name", f"{name!r} is not an adapter version name")
    return name
