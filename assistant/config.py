"""Serving configuration: one frozen dataclass, filled by the entry point (app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine import Sampling
from .limits import MAX_LORA_RANK
from .paths import DataPaths


@dataclass(frozen=True)
class ServeConfig:
    # Everything the app writes (database, prepared model, adapters) lives here.
    data_dir: Path = Path("data")
    # None: the SQLite file in data_dir. A postgresql:// URL: a database several app
    # replicas share (store.postgres); adapters, models and logs stay in data_dir.
    database: str | None = None
    # None: the embedded SmolLM2-135M-Instruct; else a local Hugging Face checkpoint folder.
    model: str | None = None
    # vLLM batches concurrent chats (5x+ the throughput of "hf" on 8 chats) and swaps
    # adapters at run time; "hf" (transformers+peft in process) is for machines where vLLM
    # cannot run.
    engine: str = "vllm"
    # Connect to vLLM servers already running (one or several, kept in step: see
    # assistant.vllm_engine) instead of starting one; each must serve the same base model,
    # have been started with LoRA and runtime loading enabled, see the adapter folders at the
    # same paths, and take the same API key.
    vllm_urls: tuple[str, ...] = ()
    vllm_api_key: str | None = None
    # vLLM's LoRA limits: see assistant.vllm_server.VLLMServerConfig and assistant.limits for why.
    max_loras: int = 4
    max_lora_rank: int = MAX_LORA_RANK
    kv_cache_gib: int = 2
    # "auto": bfloat16 where this machine computes it natively, float32 elsewhere
    # (assistant.precision); the vLLM server and the transformers engine both use it.
    dtype: str = "auto"
    # OpenAI-compatible API for holders of keys issued to accounts (app.py keys); off by
    # default: a second door is opened only when asked for.
    api: bool = False
    api_port: int | None = None  # None: port + 1
    # A training job on this machine is stopped while this many answers stream at once:
    # under heavy chat load even a background job cost chats a third of their throughput
    # (bench/busy_bench.py), while under light load (1-3 streams) it costs little and gets
    # most of its speed. 0: never stop it.
    pause_training_at: int = 4
    # Answer ahead, at background priority, what the next training job answers first (its
    # replayed questions, the gate's regression set with the live version: tuning.prepare),
    # when the app starts and whenever the live version changes.
    prepare_answers: bool = True
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
    def paths(self) -> DataPaths:
        return DataPaths(self.data_dir)

    @property
    def db_path(self) -> str | Path:
        """What the store opens: ``database``, or the SQLite file in the data folder."""
        return self.paths.database_target(self.database)

    @property
    def adapters_dir(self) -> Path:
        return self.paths.adapters

    @property
    def models_dir(self) -> Path:
        return self.models_path or self.paths.models
