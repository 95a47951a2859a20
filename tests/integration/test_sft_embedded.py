"""Teach the embedded SmolLM2-135M a domain it cannot know (issue 16): the invented Quorvia
smart pot (examples/quorvia, 164 training questions over 41 facts, 41 paraphrased questions
held out), through the command line, the store, the job row, the registry and the gate, as
an admin would: ``app.py train --sft train.jsonl --heldout heldout.jsonl --as ADMIN``.

This test teaches the first ``FACTS`` facts only (their 4 training questions each and their
held-out paraphrase), with the default recipe: the whole domain took 889 s of a 52-minute
CI run on AVX2 kernels in float32, the largest single part. This test's 20 facts
(2026-12-02, AMD EPYC 2 cores avx512_bf16, bf16, no answers kept from an earlier job):
held-out 0/20 -> 15/20, regression set 52/52 -> 50/52, gate passed, 866 s (128 replayed
answers ~130 s, 156 steps 596 s, gate 128 s). With batches of similar length (an SFT
default since; same machine, answers kept): 156 steps in 367 s instead of 552 s, 15/20,
52/52, passed. The figures below are the whole domain's.

The version must answer most held-out paraphrases right where the base answers almost none,
keep the regression set (the gate's non-inferiority check), and pass the gate on its own.

Recipe (tuning.sft.SFT_DEFAULTS and TrainConfig.replay/replay_loss): lr 5e-4, 6 epochs,
batch 8 by length, r=16 all-linear, and 128 general questions whose answers by the base are replayed
by KL (top 32). Measured outside the job (2026-11-30, AMD EPYC 2 cores avx512_bf16, bf16,
same recipe): held-out domain 0/41 -> 31/41 (76%), regression set 63/63 -> 62/63. Before
replay: 26/41 but the regression set 65/65 -> 38/65 ("The capital of China is ShijFel."),
and the gate refused it. The job's own figures are printed by this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import Store

# 20 facts: (80 rows + 128 replayed) / 8 = 26 batches, 156 steps, then the gate.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "examples" / "quorvia"
FACTS = 20


def first_facts(name: str, folder: Path) -> Path:
    """The rows of ``DOMAIN/name`` about facts q00 .. q(FACTS-1), written to ``folder``."""
    rows = [line for line in (DOMAIN / name).read_text().splitlines()
            if line.strip() and int(json.loads(line)["id"][1:3]) < FACTS]
    out = folder / name
    out.write_text("\n".join(rows) + "\n")
    return out


def test_an_sft_version_learns_the_domain_keeps_the_regression_set_and_passes_the_gate(tmp_path, embedded_model):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    train, heldout = first_facts("train.jsonl", tmp_path), first_facts("heldout.jsonl", tmp_path)
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), "train", "--sft", str(train),
         "--heldout", str(heldout), "--as", "root", "--model", str(embedded_model), "--priority", "normal"],
        capture_output=True, text=True, cwd=ROOT, timeout=2400,  # ~15 min in bf16 here; float32 machines slower
    )
    print(r.stdout[-6000:], r.stderr[-3000:], f"{time.monotonic() - started:.0f} s", sep="\n")
    assert r.returncode == 0, r.stderr
    (job,) = store.jobs()
    row = store.adapter(job["adapter_version"])
    ev = row["eval_json"]
    base, tuned = ev["live"]["domain_share"], ev["domain_share"]
    print(f"held-out domain questions right: base {base:.0%} -> v{row['version']} {tuned:.0%}; regression set "
          f"{ev['live']['golden_passed']}/{ev['golden_total']} -> {ev['golden_passed']}/{ev['golden_total']}")
    assert base <= 0.1 and tuned >= 0.7
    assert row["config_json"]["method"] == "sft" and row["config_json"]["dataset_lineage"]["rows"] == 4 * FACTS and ev["domain_total"] == FACTS
    checks = {c["check"]: c["passed"] for c in ev["checks"]}
    assert checks == {"domain": True, "regression set": True, "fluency": True} and row["gate_passed"] == 1
