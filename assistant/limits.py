"""Limits of the served model that training must respect too, each defined once.

The vLLM server is started with them (``vllm_server.VLLMServerConfig``, ``config.ServeConfig``),
adapter validation refuses past them (``adapters.validate_adapter`` is given them), and a
training job refuses at its start a setting they would refuse (``tuning.config.TrainConfig``),
so no job trains a version that promotion then turns away.
"""

from __future__ import annotations

# Largest LoRA rank the server accepts (vLLM's --max-lora-rank). vLLM reserves this much in
# each of its adapter slots, so more rank costs memory whether used or not. The DPO recipe
# trains rank 16; 32 leaves room for one doubling.
MAX_LORA_RANK = 32
