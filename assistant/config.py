"""Serving configuration: one frozen dataclass, filled by the entry point (app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine import Sampling


@dataclass(frozen=True)
class ServeConfig:
    # Everything the app writes (database, prepared model, adapters) lives here.
    data_dir: Path = Path("data")
    # None: the embedded SmolLM2-135M-Instruct; else a local Hugging Face checkpoint folder.
    model: str | None = None
    engine: str = "hf"
    # Loopback unless told otherwise: the app is not a public service by default.
    host: str = "127.0.0.1"
    port: int = 7860
    # 2048 tokens of prompt + answer: prefill of longer prompts is slow on two CPU cores,
    # and real chats here rarely need more. Trimming keeps longer chats working.
    context_tokens: int = 2048
    sampling: Sampling = field(default_factory=Sampling)
    # Prepared base models; defaults to <data_dir>/models. Several data folders (tests,
    # staging) can share one so the embedded model is dequantized once.
    models_path: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "assistant.db"

    @property
    def models_dir(self) -> Path:
        return self.models_path or self.data_dir / "models"
