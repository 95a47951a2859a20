"""Training and evaluation of LoRA adapters from user feedback (preference data, DPO, gate)."""
