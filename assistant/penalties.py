"""The frequency penalty for transformers' ``generate``, computed as vLLM computes it.

vLLM (and the OpenAI API) subtract ``frequency_penalty * count`` from the logit of every
token the answer has produced so far, counting the answer's own tokens only, never the
prompt's. transformers has ``repetition_penalty`` (which counts the prompt too, and pad
tokens in a padded batch) but no frequency penalty; this processor is the missing one, so
that the in-process engine and the gate's greedy answers are the answers vLLM serves.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class FrequencyPenalty(LogitsProcessor):
    """Subtract ``penalty`` times how often each token occurs after position ``prompt_len``."""

    def __init__(self, penalty: float, prompt_len: int):
        self.penalty = float(penalty)
        self.prompt_len = int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts
