"""A fake engine for fast tests: whitespace 'tokens', scripted answers, a call history."""

from __future__ import annotations

from collections import deque
from typing import Iterator

from assistant.engine import Adapter, Chunk, EngineError, Sampling


class FakeEngine:
    model_name = "fake-model"

    def __init__(self, context_tokens: int = 512):
        self.context_tokens = context_tokens
        self._queue: deque = deque()
        self.history: list[dict] = []  # every request: messages, sampling, adapter
        self.loaded: dict[str, Adapter] = {}

    def enqueue(self, *answers: str | Exception) -> None:
        """Answers to give next, in order; an exception is raised mid-stream instead."""
        self._queue.extend(answers)

    def count_tokens(self, messages: list[dict]) -> int:
        # One token per word plus a few per message for the template, like a chat template.
        return sum(len(m["content"].split()) + 4 for m in messages) + 2

    def stream(self, messages, sampling: Sampling, adapter: Adapter | None = None) -> Iterator[Chunk]:
        self.history.append({"messages": messages, "sampling": sampling, "adapter": adapter})
        answer = self._queue.popleft() if self._queue else f"answer {len(self.history)}"
        words = answer.split(" ") if isinstance(answer, str) else ["partial"]
        for i, w in enumerate(words):
            yield Chunk(w if i == 0 else " " + w)
        if isinstance(answer, Exception):
            raise EngineError(str(answer))
        yield Chunk("", finish_reason="stop", completion_tokens=len(words))

    def load_adapter(self, adapter: Adapter) -> None:
        self.loaded[adapter.name] = adapter

    def unload_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)

    def close(self) -> None:
        pass
