"""The same objective through TRL's DPOTrainer, kept for the side-by-side benchmark.

``TrainConfig().replace(trainer="trl")`` selects it. It optimises what ``tuning.dpo.train_loop``
does with ``TRL_RECIPE`` (sigmoid DPO + NLL over whole chosen answers, reference = adapter
disabled, computed once or at every step as ``reference`` says, AdamW, linear decay, clip
1.0) with TRL 1.16's settings spelled out, since its CPU defaults differ (learning rate
1e-6, gradient checkpointing on, no bf16). Settings only our loop has (edited tokens,
kept sentence starts, replayed answers, batches by length) are refused, not ignored:
``TrainConfig.replace(trainer="trl")`` sets them to what TRL computes.
"""

from __future__ import annotations

import tempfile
from typing import Callable

from .config import TrainConfig, epochs_for, trl_conflicts
from .dpo import Cancelled, summarize


def train_trl(model, tokenizer, pairs: list[dict], config: TrainConfig,
              progress: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    import time

    if conflicts := trl_conflicts(config):
        raise ValueError(f"TRL's DPOTrainer does not apply {', '.join(conflicts)} (TrainConfig.replace(trainer='trl') "
                         "sets what it computes)")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    history: list[dict] = []
    start = time.monotonic()

    class Report(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled at step {state.global_step} of {state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            row = {
                "step": state.global_step, "steps": state.max_steps, "epoch": float(logs.get("epoch", 0.0)),
                "loss": float(logs["loss"]), "dpo_loss": float(logs.get("loss", 0.0)),
                "nll": float(logs.get("nll_loss", logs.get("sft_loss", 0.0)) or 0.0),
                "reward_accuracy": float(logs.get("rewards/accuracies", 0.0)),
                "reward_margin": float(logs.get("rewards/margins", 0.0)),
                "chosen_reward": float(logs.get("rewards/chosen", 0.0)),
                "rejected_reward": float(logs.get("rewards/rejected", 0.0)),
                "grad_norm": float(logs.get("grad_norm", 0.0) or 0.0),
                "seconds": round(time.monotonic() - start, 2),
            }
            history.append(row)
            if progress is not None:
                progress(row)

    with tempfile.TemporaryDirectory(prefix="trl-") as out:
        args = DPOConfig(
            output_dir=out,
            learning_rate=config.learning_rate,
            num_train_epochs=epochs_for(config, len(pairs)),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=1,
            beta=config.beta,
            # reference "once": every pair's reference log-probabilities before the first
            # step (TRL's own pass, adapter disabled), as our loop's "once" does.
            precompute_ref_log_probs=config.reference == "once",
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, config.nll_weight],
            max_length=config.max_length,
            lr_scheduler_type="linear",
            warmup_steps=0,
            max_grad_norm=config.max_grad_norm,
            weight_decay=config.weight_decay,
            bf16=config.dtype == "bfloat16",
            use_cpu=True,
            gradient_checkpointing=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            seed=config.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Report()])
        trainer.train()
    # TRL may add a 'ref' adapter next to 'default'; only 'default' is the new version.
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    model.set_adapter("default")
    model.eval()
    return summarize(history)
