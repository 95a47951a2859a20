"""Training and evaluation of LoRA adapters from user feedback.

``trainer.train_adapter`` runs a job (DPO on preference pairs -> validated adapter ->
gate against the live version -> registered version); ``gate`` holds the verdict and
``promote``; ``python -m tuning.train`` is the command line. Nothing here is imported by
serving code.
"""
