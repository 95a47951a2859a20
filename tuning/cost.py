"""What a version cost: trainable parameters, measured seconds x price, and full fine-tuning.

The full fine-tuning figure is an estimate from the work per token, not a second run:
with a frozen base, a LoRA DPO step runs the policy forward (2N FLOPs per token for N
parameters), the reference forward with the adapter off (2N) and a backward pass that
only needs activation gradients (about 2N; the adapter's own weight gradients are tiny):
about 6N. Full fine-tuning runs the same forwards plus weight gradients for all N
parameters (backward about 4N): about 8N, so about 4/3 of the measured time, and its
optimiser step touches N parameters instead of the adapter's. It also needs a separate
frozen copy of the model as reference and fp32 weights, gradients and two AdamW moments
(16 bytes per parameter), which is what the memory estimate counts.
"""

from __future__ import annotations

# Work per token, in units of N FLOPs (see the module docstring).
LORA_WORK = 2 + 2 + 2  # policy forward + reference forward + activation-only backward
FULL_WORK = 2 + 2 + 4  # policy forward + reference forward + full backward


def trainable_params(model) -> tuple[int, int, float]:
    """(trainable, total, trainable share) of a model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, trainable / total if total else 0.0


def estimate_cost(train_seconds: float, price_per_hour: float, total_params: int, trainable: int) -> dict:
    """The run's cost next to an estimate for fully fine-tuning the same model on the same data."""
    full_seconds = train_seconds * FULL_WORK / LORA_WORK
    base = total_params - trainable
    return {
        "price_per_hour": price_per_hour,
        "train_seconds": round(train_seconds, 1),
        "estimated_usd": round(train_seconds / 3600 * price_per_hour, 6),
        "full_finetune_seconds": round(full_seconds, 1),
        "full_finetune_usd": round(full_seconds / 3600 * price_per_hour, 6),
        # fp32 weights + grads + AdamW m and v for the policy, plus a bf16 reference copy.
        "full_finetune_state_gb": round(base * (16 + 2) / 1e9, 2),
        "lora_state_gb": round((base * 4 + trainable * 16) / 1e9, 2),
        "formula": f"full = measured x {FULL_WORK}/{LORA_WORK} (work per token, see tuning/cost.py)",
    }
