"""Teach the embedded SmolLM2-135M a domain it cannot know (issue 16): the invented Quorvia
smart pot (examples/quorvia, 164 training questions over 41 facts, 41 paraphrased questions
held out), through the command line, the store, the job row, the registry and the gate, as
an admin would: ``app.py train --sft train.jsonl --heldout heldout.jsonl --as ADMIN``.

This test teaches the first ``FACTS`` facts only (their 4 training questions each and their
held-out paraphrase), with the default recipe but ``REPLAY`` replayed general answers
instead of 128: CI may land on a 2-core AVX2-only CPU, and the one a user tried (2026-11-30)
took about 18 s per float32 DPO step where an EPYC with AVX2-limited kernels took 3.7 s, so
the whole suite must leave room inside CI's 90 minutes. With 20 facts and 128 replayed
answers (26 batches, 156 steps) this test took 499 s of a 37-minute CI run on an Intel Xeon
in float32, the largest single part; with 12 facts and 48 replayed answers (12 batches, 72
steps; 2026-12-06, same Xeon, avx2 avx512f avx512_bf16, float32): held-out 0/12 -> 10/12,
regression set 52/52 -> 51/52, gate passed, 269 s (48 replayed answers 44 s, 72 steps 163 s,
gate 41 s). The figures below are the whole domain's, with the default 128 replayed answers.

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

# 12 facts: (48 rows + 48 replayed) / 8 = 12 batches, 72 steps, then the gate.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "examples" / "quorvia"
FACTS, REPLAY = 12, 48


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
         "--heldout", str(heldout), "--as", "root", "--model", str(embedded_model), "--priority", "normal",
         "--set", f"replay={REPLAY}"],
        capture_output=True, text=True, cwd=ROOT, timeout=2400,  # 4.5 min on the Xeon in float32; allow an AVX2-only CPU 5x that
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
