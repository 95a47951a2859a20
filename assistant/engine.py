"""The engine interface: stream a chat completion, optionally through a named LoRA adapter.

An engine knows messages, tokens and adapters; it knows nothing of users, storage or the
web page. Two implement it: ``vllm_engine.VLLMEngine`` (a client of a vLLM server, the
default) and ``hf_engine.HFEngine`` (transformers + peft in the app's process, one request
at a time); tests use ``tests/fakes.FakeEngine``, which has the same shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Protocol


class EngineError(RuntimeError):
    """The engine could not answer (crashed, unreachable, refused an adapter...)."""


@dataclass(frozen=True)
class Sampling:
    # Low but non-zero: small models derail at higher temperatures (SmolLM2's card suggests
    # 0.2), and "retry" still gets a different answer. Greedy (0.0) for evaluation.
    temperature: float = 0.3
    top_p: float = 0.9
    # 256 new tokens keeps one answer under ~15 s on two CPU cores with transformers.
    max_new_tokens: int = 256
    # Subtracted from a token's logit per time the answer already used it (vLLM's and
    # OpenAI's frequency penalty: the answer's tokens only, not the prompt's). Measured on
    # 100 ordinary prompts x 2 samples at the defaults above (bench/sampling_bench.py):
    # answers repeating themselves 40% -> 6% at 0.5, the regression set 62/65 -> 63/65.
    # A repetition penalty of 1.1 stopped all repeats but cost facts (59/65): it also
    # penalises the question's words, which a right answer repeats.
    frequency_penalty: float = 0.5
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter version as the engine sees it: an immutable name and a folder."""

    name: str
    path: str
    version: int


@dataclass
class Chunk:
    """A piece of a streamed answer; the last one has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int | None = None


class Engine(Protocol):
    model_name: str  # identity of the base model, logged with every answer
    context_tokens: int  # prompt + answer must fit in this many tokens

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens the prompt takes once the chat template is applied (generation prompt included)."""
        ...

    def stream(
        self, messages: list[dict], sampling: Sampling, adapter: Adapter | None = None
    ) -> Iterator[Chunk]:
        """Yield the answer to ``messages`` piece by piece."""
        ...

    def load_adapter(self, adapter: Adapter) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def close(self) -> None: ...
