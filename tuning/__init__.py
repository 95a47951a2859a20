"""Training and evaluation of LoRA adapters from user feedback (runs in a job process, not in
the server).

``pairs.build_preferences`` turns the store's feedback into preference pairs;
``trainer.train_adapter`` runs a job (DPO on those pairs -> validated adapter -> the
``gate`` against the live version -> registered version). Promotion, the canary, the
schedule and the job launcher are the online loop, in ``loop/``. Nothing here is imported
by ``assistant/``.
"""
