"""Teach the embedded SmolLM2-135M a domain it cannot know (issue 16): the invented Quorvia
smart pot (examples/quorvia, 164 training questions over 41 facts, 41 paraphrased questions
held out), through the command line, the store, the job row, the registry and the gate, as
an admin would: ``app.py train --sft train.jsonl --heldout heldout.jsonl --as ADMIN``.

The version must answer most held-out paraphrases right where the base answers almost none,
keep the regression set (the gate's non-inferiority check), and pass the gate on its own.

Recipe (tuning.sft.SFT_DEFAULTS and TrainConfig.replay/replay_loss): lr 5e-4, 6 epochs,
batch 8, r=16 all-linear, and 128 general questions whose answers by the base are replayed
by KL (top 32). Measured outside the job (2026-11-30, AMD EPYC 2 cores avx512_bf16, bf16,
same recipe): held-out domain 0/41 -> 31/41 (76%), regression set 63/63 -> 62/63. Before
replay: 26/41 but the regression set 65/65 -> 38/65 ("The capital of China is ShijFel."),
and the gate refused it. The job's own figures are printed by this test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import Store

# About 8 minutes on 2 cores in bf16 (replay answers, 222 steps at ~1.5 s, the gate).
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "examples" / "quorvia"


def test_an_sft_version_learns_the_domain_keeps_the_regression_set_and_passes_the_gate(tmp_path, embedded_model):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), "train", "--sft", str(DOMAIN / "train.jsonl"),
         "--heldout", str(DOMAIN / "heldout.jsonl"), "--as", "root", "--model", str(embedded_model), "--priority", "normal"],
        capture_output=True, text=True, cwd=ROOT, timeout=2400,  # ~8 min in bf16; float32 machines ~2-3x
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
    assert row["config_json"]["method"] == "sft" and row["config_json"]["dataset_lineage"]["rows"] == 164
    checks = {c["check"]: c["passed"] for c in ev["checks"]}
    assert checks == {"domain": True, "regression set": True, "fluency": True} and row["gate_passed"] == 1
