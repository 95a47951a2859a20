"""Teach the embedded SmolLM2-135M a domain it cannot know (issue 16): the invented Quorvia
smart pot (examples/quorvia, 164 training questions over 41 facts, 41 paraphrased questions
held out), through the command line, the store, the job row, the registry and the gate, as
an admin would: ``app.py train --sft train.jsonl --heldout heldout.jsonl --as ADMIN``.

The version must answer most held-out paraphrases right where the base answers almost none,
keep the regression set (the gate's non-inferiority check), and pass the gate on its own.

Measured once (2026-11-30, AMD EPYC 2 cores shared with another training run, bfloat16,
SFT_DEFAULTS: lr 5e-4, 4 epochs, batch 8, r=16 all-linear; 84 steps in 741 s, gate 62 s):
held-out domain questions right 0% (base) -> 63% (26 gained, 0 lost), but the regression
set fell from 65/65 to 38/65 ("The capital of China is ShijFel."), so the gate refused the
version, as it should. Hence xfail until a recipe keeps general knowledge (next to try:
mixing in the base model's own answers to general questions as replay rows, a lower rate).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import Store

# Not in the default run: it does not pass yet (the docstring's figures) and costs about
# 13 minutes of CI's budget. ASSISTANT_DOMAIN_TEST=1 runs it, as the figures were taken.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("ASSISTANT_DOMAIN_TEST") != "1",
    reason="measured 2026-11-30: domain 0% -> 63% but regression set 65/65 -> 38/65, gate refused (docstring); "
           "ASSISTANT_DOMAIN_TEST=1 runs it")]
ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "examples" / "quorvia"


def test_an_sft_version_learns_the_domain_keeps_the_regression_set_and_passes_the_gate(tmp_path, embedded_model):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), "train", "--sft", str(DOMAIN / "train.jsonl"),
         "--heldout", str(DOMAIN / "heldout.jsonl"), "--as", "root", "--model", str(embedded_model), "--priority", "normal"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,  # 13.4 min measured on 2 shared cores
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
