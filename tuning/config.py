"""Training configuration: one frozen dataclass, recorded with every job and adapter version.

The defaults are the recipe measured to change what SmolLM2-135M *generates* on a 2-core
CPU (docs/platform facts): DPO alone raised held-out log-prob preference to 1.0 while the
greedy answers did not change at all; on-policy pairs + an NLL term on chosen + lr 5e-5 +
r=16 on every linear layer + 2 epochs moved 8 of 8 held-out answers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from assistant.limits import MAX_LORA_RANK


# epochs "auto": two passes over a small job's examples, one over a larger one's.
AUTO_TWO_EPOCHS = 128

# What TRL's DPOTrainer computes (``trainer="trl"``, tuning.trl_trainer), in this config's
# terms: sigmoid DPO and NLL over whole answers, no replayed answers, shuffled batches.
# The other values of these settings exist in our loop only. ``replace(trainer="trl")``
# takes these values for the ones not asked for with it, so the job records what it ran;
# asking for another value together with trainer "trl" is refused by name.
TRL_RECIPE = {"dpo_tokens": "answer", "nll_tokens": "answer", "nll_kept_starts": False,
              "unlike_kept_starts": 0.0, "replay": 0, "by_length": False, "chosen_tail": 0}


def epochs_for(config: "TrainConfig", examples: int) -> int:
    """The epochs a job over ``examples`` training pairs and votes runs: ``config.epochs``,
    or for "auto" 2 up to AUTO_TWO_EPOCHS examples and 1 above."""
    if config.epochs != "auto":
        return int(config.epochs)
    if config.method == "sft":  # teaching facts takes more passes (tuning.sft.SFT_DEFAULTS)
        from .sft import SFT_DEFAULTS

        return SFT_DEFAULTS["epochs"]
    return 2 if examples <= AUTO_TWO_EPOCHS else 1


@dataclass(frozen=True)
class TrainConfig:
    # -- LoRA ---------------------------------------------------------------------------
    # r=16 on all linear layers: r=8 on q/v only did not move generations within 2 epochs
    # on a few hundred pairs; 16 is also under the served limit (assistant.limits: 32).
    rank: int = 16
    # alpha = 2r, the usual scale; the learning rate below was measured with it.
    alpha: int = 32
    # No dropout: a few hundred pairs and 2 epochs do not overfit through the adapter, and
    # dropout makes the policy differ from the (dropout-free) reference at step 1.
    dropout: float = 0.0
    # peft's "all-linear": every attention and MLP projection, never the (tied) lm_head.
    target_modules: str = "all-linear"
    # Only the top N decoder layers get LoRA (0: all). The backward pass then stops at the
    # lowest adapted layer: fewer layers, less work per step.
    lora_layers: int = 0

    # -- objective ----------------------------------------------------------------------
    # DPO's temperature: 0.1 is the paper's and TRL's default; lower let the policy drift
    # further from the base before the loss saturates.
    beta: float = 0.1
    # Weight of the NLL (SFT) term on the chosen answer next to the DPO sigmoid loss: it is
    # what turned a preference the model *scores* into one it *generates*, and it kept
    # answers fluent (plain DPO at lr 1e-4 degenerated into "Smol! I'm a Smol!...").
    nll_weight: float = 1.0
    # Which chosen tokens the NLL term counts: "answer" (all, TRL's "sft" loss), "edit"
    # (only those the user's edit changed: tuning.dpo.edited_tokens) or "both" (the sum of
    # the two per-token means).
    nll_tokens: str = "both"
    # Which answer tokens DPO's log-ratios count: "answer" (all) or "edit" (in each answer,
    # only what tells it from the other: tuning.dpo.edited_tokens). With an added opening,
    # "answer" also pushes down the unchanged rest of the rejected answer in its own
    # context, and the model lost facts where it did not open with the phrase.
    dpo_tokens: str = "edit"
    # Edits that only add text after the whole shown answer (a closing sentence, a sign-off)
    # also train against that text added after the answer's first sentence
    # (tuning.dpo.early_close_pairs): the user kept every sentence, so an answer that closes
    # after one is worse. Without it the preference suite's "closing" version added the
    # sentence to 31/32 held-out answers but after fewer of them (27 tokens vs the chosen
    # answers' 58), and the gate refused it for answer length. Measured, not taken
    # (2026-12-02, suite "closing" at 256 tokens, EPYC, bf16): 92 such pairs beside 106,
    # closing 32/32, regression 52/52, words 105 -> 61.6 (38.7 without, on a Xeon), still
    # refused for answer length (51.8 gate tokens vs live 252.2; 46.0 without) at twice the
    # steps (100, 1391 s): the version still closes after a few sentences.
    early_close: bool = False
    # The NLL term's edit mean (nll_tokens "edit" or "both") also counts, before text the
    # edit added, the first token of every sentence the user kept after another sentence
    # (tuning.dpo.kept_starts): the user went on there rather than add the text, so the
    # version should too. The per-token counterpart of early_close, at no extra forward.
    # Preference suite, 2026-12-06, Xeon, float32, mixed questions, closing: held-out
    # answers 43.3 words where users' edits are 46.0 (29.5 without), 31/32 closing when
    # given 96 tokens, 52/52 regression, passed. Only edits that add text after kept
    # sentences get more marks (closing 99 of 128 pairs; list 5; shorter, question and
    # opening 0); length hacking and contradictory users were still refused with it.
    nll_kept_starts: bool = True
    # Weight of an unlikelihood term, -log(1 - p), on the first token of the text an edit
    # added at the end (a closing's first word; the end-of-turn of an answer cut short), at
    # every sentence start the user kept before it (tuning.dpo.kept_unlikes): where the
    # user went on, what they added at the end should not come yet. 0: off. Preference
    # suite, 2026-12-06, Xeon, float32, closing taught from 256-token answers (the served
    # length): 84.2 words where users' edits are 106.3 (63.1 without), 28/32 closing (the
    # misses: 2 cut by the 256-token limit at the users' length, 2 unclosed), 52/52,
    # passed; weight 2: 93.0 words, 24/32, refused for fluency. From 64-token answers
    # (96 held-out tokens): 27/32, 54.3 words (users' 46.0; 43.3 without), 52/52, passed.
    # List unchanged (32/32, 50/52, passed); length hacking and contradictory users refused.
    # Measured again 2026-12-07 night (same recipe, 128 edits, AVX2 caps): 79.1 words, 26/32,
    # refused for length (-54%, limit 50%): at the gate's edge (README, "Fewer steps").
    unlike_kept_starts: float = 1.0
    # With dpo_tokens "edit": the chosen answer ends this many tokens after its last edited
    # token (0: never). Nothing but the NLL term's whole-answer mean reads what follows, and
    # there the chosen answer is the model's own (the on-policy answer it was shown), which
    # the replayed answers' KL holds it to as well. Only edits early in a long answer lose
    # tokens: of the preference suite's 128 edits at 256 tokens, 102 openings (19884 chosen
    # tokens -> 4293) and 6 lists (-53 tokens); shorter, closing, question and the bad kinds'
    # pairs are unchanged. Preference suite, opening, 288 edits (259 pairs), answers of up
    # to 256 tokens, 2026-12-07, Xeon with AVX2 caps, float32, prepared: 5.5 s/step and 524 s
    # to a gated version against 9.7 and 838 s with the whole answer, run just before (README,
    # "The chosen answer's tail"); both 32/32, 52/52, passed; 107.2 words (users' 107.0).
    chosen_tail: int = 32
    # The reference model's log-probabilities: "step" (a no-grad forward with the adapter
    # off at every step) or "once" (for every pair before training; the same numbers
    # without a forward per pair per epoch).
    reference: str = "once"

    # Which objective a feedback job trains. "auto": what the data supports (tuning.kto.
    # choose_objective): pairs only -> DPO, lone up/down votes only -> KTO, both -> one job
    # with both losses (DPO steps on pairs, KTO steps on votes). "dpo": pairs only, as
    # before KTO existed (lone votes are ignored). "kto": KTO on everything, each pair
    # split into a desirable and an undesirable example (TRL's unpaired conversion).
    objective: str = "auto"
    # KTO's temperature, its own setting so tuning DPO's beta does not move KTO: 0.1 is the
    # paper's and TRL's KTOConfig default.
    kto_beta: float = 0.1
    # Weights of the desirable and undesirable losses (TRL's desirable_weight and
    # undesirable_weight, both 1.0 there). The paper advises weighting so that
    # desirable_weight * n_up / (undesirable_weight * n_down) is within [1, 4/3]; with
    # skewed votes, set them (the job records the up and down counts it saw).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # NLL per token on the desirable (up-voted) answers next to the KTO loss, for the reason
    # nll_weight exists for DPO: a preference only scored did not move greedy answers here,
    # the NLL term on the preferred side did. 0 turns it off.
    kto_nll_weight: float = 1.0
    # Which up-voted tokens that NLL term counts: "answer" (all) or "both" (all, plus the
    # mean over the tokens that spell what up-voted answers add: the token pairs much
    # commoner in them than in down-voted ones, tuning.kto.added_tokens), the votes'
    # counterpart of nll_tokens="both" for pairs. Thumbs-only preference suite, "one
    # sentence and a closing question", 106 votes: 0/32 held-out answers with "answer"
    # (0/32 also at kto_nll_weight 3), 22/32 with "both". Where up-voted answers add nothing
    # (shorter answers) there is nothing to stress and both settings train alike.
    kto_nll_tokens: str = "both"

    # -- optimisation -------------------------------------------------------------------
    # 5e-5: 1e-4 over-optimised within an epoch; 1e-6 (TRL's default) moves nothing on CPU
    # budgets. Linear decay to zero, AdamW, clip 1.0: TRL's defaults, so both trainers match.
    learning_rate: float = 1e-4
    # "auto" (``epochs_for``): 2 epochs over up to AUTO_TWO_EPOCHS training examples (pairs
    # plus votes), 1 over more. Measured on 256 "one sentence" pairs in float32 on AVX2
    # kernels (bench/dpo_bench.py --job-only): 2 epochs (128 steps) took 685 s to a gated
    # version and lost 3 of the 52 regression answers (refused); 1 epoch (64 steps) took
    # 456 s, taught the same 32/32 and lost 1 (passed). Up to 128 examples nothing changed:
    # every preference-suite and rounds job (<= 106 pairs) ran 2 epochs.
    epochs: int | str = "auto"
    # 4 pairs (8 sequences) per step: bigger batches gained no tokens/s on two cores.
    batch_size: int = 4
    # Batches of similar length (less padding; tuning.dpo._batches) instead of plain shuffled.
    by_length: bool = False
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # Prompt + answer tokens per sequence. Chat pairs here are ~100-300 tokens; longer ones
    # keep the end of the prompt and the start of the answer (what the preference is about).
    max_length: int = 512
    # Number format of the steps. "auto" (assistant.precision): bf16 autocast over fp32
    # weights where the CPU computes bf16 natively (~20% faster per step on AVX512_BF16;
    # LoRA weights and optimiser state stay fp32), plain float32 elsewhere: on an AVX2-only
    # EPYC a bf16 step took minutes (reference kernels, 1.2 GFLOPS against 60 in fp32).
    # The job records the format it resolved to.
    dtype: str = "auto"
    seed: int = 0

    # -- what is learned ----------------------------------------------------------------
    # "dpo": users' feedback (the default, the online loop; ``objective`` says whether
    # pairs train by DPO, lone votes by KTO, or both). "sft": the
    # answers of an admin's data set (``dataset``), e.g. to teach a domain; its gate checks
    # the data set's held-out questions instead of preference pairs (tuning.gate.decide_sft).
    method: str = "dpo"
    # With method "sft": the data set's content hash (tuning.dataset.store_dataset), never a
    # path: a job reads only what an admin added to <data_dir>/datasets/.
    dataset: str | None = None
    # How many general questions (tuning.general and tuning.synthetic, none of them in the
    # gate's regression set) the starting model answers greedily before training; those
    # answers train beside the data set or the feedback ("replay"), so the version keeps
    # answering like the model it started from where the data says nothing.
    # Measured on the Quorvia set (164 rows, lr 5e-4, bf16; README "Teaching it a
    # domain"): without replay the regression set fell 65/65 -> 38/65; 128 replayed
    # answers by NLL 56/63, by KL 61/63 (4 epochs) and 62/63 (6 epochs). 0 turns it off.
    replay: int = 128
    # How replayed rows train: "kl" (the starting model's next-token distribution at each
    # of the answer's positions, its top 32, computed once: tuning.sft.with_replay_reference)
    # or "nll" (its greedy answer as the target, like any other row). With the same 128
    # rows, KL kept 61/63 of the regression set and learned 26/41 held-out domain
    # questions; NLL kept 56/63 and learned 23/41: a distribution says more than its argmax.
    replay_loss: str = "kl"
    # Feedback jobs (DPO, KTO): each step also trains the next replay_per_step replayed rows
    # (cycling), their loss times replay_weight added to the step's (tuning.dpo.optimise).
    # An SFT job mixes them into its batches instead.
    replay_per_step: int = 4
    replay_weight: float = 1.0

    # -- which trainer ------------------------------------------------------------------
    # "loop" (tuning.dpo, our own) or "trl" (TRL's DPOTrainer). The loop was kept: same
    # losses, faster per step here (bench/dpo_bench.py, README "Training").
    trainer: str = "loop"
    # Optional: continue training this registered version instead of starting from zero.
    # The DPO reference stays the base model either way.
    continue_from: int | None = None

    # -- registry, serving and cost -----------------------------------------------------
    # Validation refuses adapters of higher rank. It is the served limit (assistant.limits,
    # the vLLM server's --max-lora-rank) and may only be lowered: a version above it would
    # train and register, and then promotion would refuse it.
    max_rank: int = MAX_LORA_RANK
    # Price of one hour of the machine the job ran on, for the cost estimate (USD). A
    # 2-vCPU, 24 GB cloud VM is about 0.10/h on demand; set yours.
    price_per_hour: float = 0.10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes``; unknown keys and wrong types are refused by name."""
        if "bf16" in changes:  # the boolean setting of earlier versions, in old queued jobs
            changes = {**changes}
            changes.setdefault("dtype", "bfloat16" if changes.pop("bf16") else "float32")
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"Unknown training setting(s): {', '.join(unknown)}. Known: {', '.join(fields)}.")
        clean = {}
        for key, value in changes.items():
            default = getattr(self, key)
            if key == "epochs":  # a whole number or "auto", whatever it is now
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, not {value!r}.")
            elif isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{key} must be a number, not {value!r}.")
                value = type(default)(value)
            clean[key] = value
        if clean.get("trainer") == "trl":
            clean = {**TRL_RECIPE, **clean}
        new = dataclasses.replace(self, **clean)
        new.check()
        return new

    def check(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, not {self.dtype!r}.")
        if self.kto_nll_tokens not in ("answer", "both"):
            raise ValueError(f"kto_nll_tokens must be 'answer' or 'both', not {self.kto_nll_tokens!r}.")
        if self.nll_tokens not in ("answer", "edit", "both"):
            raise ValueError(f"nll_tokens must be 'answer', 'edit' or 'both', not {self.nll_tokens!r}.")
        if self.dpo_tokens not in ("answer", "edit"):
            raise ValueError(f"dpo_tokens must be 'answer' or 'edit', not {self.dpo_tokens!r}.")
        if self.reference not in ("step", "once"):
            raise ValueError(f"reference must be 'step' or 'once', not {self.reference!r}.")
        if self.chosen_tail < 0:
            raise ValueError("chosen_tail must be 0 (the whole chosen answer) or a number of tokens.")
        if self.lora_layers < 0:
            raise ValueError("lora_layers must be 0 (every layer) or a number of top layers.")
        if self.method not in ("dpo", "sft"):
            raise ValueError(f"method must be 'dpo' or 'sft', not {self.method!r}.")
        if self.method == "sft" and not (isinstance(self.dataset, str) and re.fullmatch(r"[0-9a-f]{64}", self.dataset)):
            raise ValueError("method 'sft' needs dataset=<the data set's 64-digit hash> (app.py dataset add FILE prints it).")
        if self.method == "dpo" and self.dataset is not None:
            raise ValueError("dataset is for method 'sft'; DPO trains on users' feedback.")
        if self.objective not in ("auto", "dpo", "kto"):
            raise ValueError(f"objective must be auto, dpo or kto, not {self.objective!r}.")
        if self.method == "sft" and self.objective != "auto":
            raise ValueError("objective is for feedback jobs (method 'dpo'); an SFT job trains on its data set.")
        if self.trainer == "trl" and self.objective == "kto":
            raise ValueError("trainer 'trl' runs DPO only; KTO runs in our own loop (trainer 'loop').")
        if not (self.kto_beta > 0 and self.desirable_weight >= 0 and self.undesirable_weight >= 0
                and self.kto_nll_weight >= 0):
            raise ValueError("kto_beta must be positive; desirable_weight, undesirable_weight and kto_nll_weight "
                             "at least 0.")
        if self.trainer not in ("loop", "trl"):
            raise ValueError(f"trainer must be 'loop' or 'trl', not {self.trainer!r}.")
        if self.trainer == "trl" and self.method == "sft":
            raise ValueError("trainer 'trl' runs DPO only; an SFT job trains in our own loop (trainer 'loop').")
        if self.trainer == "trl" and (unknown := trl_conflicts(self)):
            raise ValueError(
                "trainer 'trl' runs TRL's DPOTrainer, which trains DPO and NLL over whole answers without "
                f"replayed answers; these settings are our loop's only: {', '.join(unknown)}. Leave them out "
                "(trainer=trl then sets " + ", ".join(_as_set(k, v) for k, v in TRL_RECIPE.items())
                + "), or use trainer=loop.")
        if self.replay_loss not in ("nll", "kl"):
            raise ValueError(f"replay_loss must be 'nll' or 'kl', not {self.replay_loss!r}.")
        if not 0 <= self.unlike_kept_starts <= 100:
            raise ValueError("unlike_kept_starts must be 0 (off) to 100.")
        if not 0 <= self.replay <= 250:  # tuning.general and tuning.synthetic: about 250 questions
            raise ValueError("replay must be 0 to 250 (general questions answered before training).")
        if not (1 <= self.replay_per_step <= 64 and 0 <= self.replay_weight <= 100):
            raise ValueError("replay_per_step must be 1 to 64 and replay_weight 0 to 100.")
        if self.epochs != "auto" and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be 'auto' or a whole number of at least 1, not {self.epochs!r}.")
        for key in ("rank", "alpha", "batch_size", "max_length", "max_rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1.")
        if self.max_rank > MAX_LORA_RANK:
            raise ValueError(f"max_rank {self.max_rank} is above the served LoRA rank limit of {MAX_LORA_RANK} "
                             "(assistant.limits): serving would refuse the version this trains.")
        if self.rank > self.max_rank:
            raise ValueError(f"rank {self.rank} exceeds the served LoRA rank limit max_rank={self.max_rank}: "
                             "serving would refuse the version this trains.")
        if not (self.learning_rate > 0 and self.beta > 0):
            raise ValueError("learning_rate and beta must be positive.")


def _as_set(key: str, value) -> str:
    """``key=value`` as ``--set`` takes it (true/false, not Python's True/False)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def trl_conflicts(config: TrainConfig) -> list[str]:
    """The settings of ``config`` TRL's DPOTrainer would not apply, as ``key=value``."""
    return [_as_set(k, getattr(config, k)) for k, v in TRL_RECIPE.items() if getattr(config, k) != v]
