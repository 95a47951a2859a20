"""Training over several processes (tuning.distributed): two CPU processes under torchrun
(gloo, loopback) train the same adapter as one process; a cancel or a failing rank ends the
run instead of leaving a rank waiting; a whole job under torchrun registers one version."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dist_worker
from tiny import save_tiny_checkpoint, toy_pairs
from tuning.distributed import World, split

ROOT = Path(__file__).resolve().parent.parent
# 10 pairs in batches of 3: global batches of 3, 3, 3 and 1 item, so the two ranks get
# uneven shares (2 and 1) and, at the last batch, one rank none. 8 replayed general answers
# (those the tiny model does not leave empty), 3 per step, split across ranks the same way.
CONFIG = {"rank": 4, "alpha": 8, "learning_rate": 1e-3, "epochs": 2, "batch_size": 3, "dtype": "float32",
          "replay": 8, "replay_per_step": 3}
# One process and two differ by rounding only (tuning.distributed, "What is exact"): seen
# 1.5e-8 (DPO) and 3e-8 (KTO) at most, on LoRA weights that training moved by about 1e-2.
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 300  # a bound for a hang, far above the ~20 s a run takes on an idle 2-core machine


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    checkpoint = save_tiny_checkpoint(folder / "tiny-chat")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(10)))
    return folder, checkpoint, pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N ARGS`` on loopback, bounded by LAUNCH_TIMEOUT_S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def test_a_batch_is_shared_out_whole_and_in_order():
    batch = list(range(10))
    shares = [split(batch, World(rank, 4)) for rank in range(4)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [split([7], World(rank, 2)) for rank in range(2)] == [[7], []]
    assert split(batch, World()) == batch


# Per-step losses of one and two processes: DPO and SFT differ by rounding; KTO's reference
# point z0 is estimated on each rank's share (tuning.distributed), seen 2e-4 apart.
LOSS_REL = {"dpo": 1e-5, "dpo-replay": 1e-5, "sft": 1e-5, "kto": 1e-3}


@pytest.mark.parametrize("objective", ["dpo", "dpo-replay", "sft", "kto"])
def test_two_processes_train_the_same_adapter_as_one(files, objective):
    """DPO (shares weighed by pairs), SFT (by answer tokens), KTO (by votes, its NLL term by
    up-votes): the same adapter, in 8 steps of uneven shares."""
    import torch

    from tuning.config import TrainConfig
    from tuning.trainer import build_model

    folder, checkpoint, _ = files
    one_pt, two_pt = folder / f"one-{objective}.pt", folder / f"two-{objective}.pt"
    assert dist_worker.main(str(checkpoint), str(one_pt), json.dumps(CONFIG), "train", objective) == 0
    done = torchrun("tests/dist_worker.py", str(checkpoint), str(two_pt), json.dumps(CONFIG), "train", objective)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = torch.load(one_pt), torch.load(two_pt)
    assert (one["processes"], two["processes"]) == (1, 2)

    initial = {k: v.detach() for k, v in build_model(checkpoint, TrainConfig().replace(**CONFIG))[0].named_parameters()}
    assert one["lora"].keys() == two["lora"].keys() and len(one["lora"]) > 0
    moved = max(float((w - initial[k]).abs().max()) for k, w in one["lora"].items())
    apart = max(float((w - two["lora"][k]).abs().max()) for k, w in one["lora"].items())
    assert moved > 100 * TOLERANCE  # training changed the adapter, so agreeing can fail
    assert apart < TOLERANCE, (apart, moved)
    # The same steps, with the whole batch's figures on both sides.
    assert [r["step"] for r in one["rows"]] == [r["step"] for r in two["rows"]] == list(range(1, 9))
    for a, b in zip(one["rows"], two["rows"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_REL[objective])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=100 * LOSS_REL[objective])
        assert a.get("reward_accuracy") == pytest.approx(b.get("reward_accuracy"))
    if objective == "dpo-replay":  # every step also trained the replayed answers, on both sides
        assert one["metrics"]["replay_rows"] == two["metrics"]["replay_rows"] == 5
        assert all(r["replay_kl"] is not None for r in one["rows"] + two["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("mode, says", [("cancel", "cancelled"), ("fail", "rank 1 fails on purpose")])
def test_a_cancel_or_a_failing_rank_ends_every_rank(files, mode, says):
    """The leader's stop reaches every rank at the same step; a rank that dies makes the
    others fail at their next collective, and torchrun ends the group: nobody waits."""
    folder, checkpoint, pairs = files
    started = time.monotonic()
    done = torchrun("tests/dist_worker.py", str(checkpoint), str(folder / f"{mode}.pt"), json.dumps(CONFIG), mode)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and says in out, out[-3000:]
    assert not (folder / f"{mode}.pt").exists()
    if mode == "cancel":  # both ranks stopped, at the same step
        assert "rank 0: cancelled: cancelled at step 2 of 8" in out and "rank 1: cancelled: cancelled at step 2 of 8" in out
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S


@pytest.mark.slow
def test_a_job_under_torchrun_registers_one_version(files, tmp_path):
    """``torchrun --nproc-per-node 2 -m tuning.train``: one job row, one version, trained by
    two processes (recorded), the second rank gone without touching the store."""
    from store import Store

    _, checkpoint, pairs = files
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(4, start=100, prefix="e")))
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    sets = [x for k, v in CONFIG.items() for x in ("--set", f"{k}={v}")]
    done = torchrun("-m", "tuning.train", "--data-dir", str(tmp_path), "--model", str(checkpoint),
                    "--pairs", str(pairs), "--eval-pairs", str(held), "--as", "root", "--priority", "normal", *sets)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 1/2: training 10 pairs" in done.stdout and "on 2 processes" in done.stdout
    [job] = store.jobs()
    assert job["status"] == "succeeded" and job["config_json"]["processes"] == 2
    [version] = store.adapters()
    assert version["version"] == job["adapter_version"] and version["metrics_json"]["steps"] == 8
