"""Training and evaluation of LoRA adapters from user feedback.

``pairs.build_preferences`` turns the store's feedback into preference pairs;
``trainer.train_adapter`` runs a job (DPO on those pairs -> validated adapter -> the
``gate`` against the live version -> registered version); ``train.run_from_app`` is
``app.py train`` (the job the console's launcher starts) and ``python -m tuning.train`` the
command line over pairs files. Promotion, the canary and the schedule (``control``,
``canary``, ``versions``, ``commands``) live here too for now, though they run inside the
server (docs/architecture.md says where they are going). Nothing here is imported by
``assistant/``.
"""
