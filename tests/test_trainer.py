"""A whole training job on the tiny checkpoint: registry row, atomic folder, cancel, failure,
a killed process cleaned up on the next start."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tiny import save_tiny_checkpoint, toy_pairs
from tuning.config import TrainConfig
from tuning.gate import GateConfig, Golden
from loop.jobs import recover_stale_jobs
from tuning.trainer import TMP_PREFIX, train_adapter

ROOT = Path(__file__).resolve().parent.parent
FAST = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=2, batch_size=4, dtype="float32")
GATE = GateConfig(golden=(Golden("question 1?", ("yes",)),), max_new_tokens=8, max_length_prompts=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat")


def run(store, data, checkpoint, **kw):
    kw.setdefault("config", FAST)
    kw.setdefault("gate_config", GATE)
    return train_adapter(toy_pairs(16), toy_pairs(8, start=100, prefix="e"), store=store, data_dir=data,
                         base_model_dir=checkpoint, **kw)


def adapter_dirs(data):
    root = data / "adapters"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_job_registers_a_loadable_version_with_everything_recorded(store, tmp_path, checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from assistant.adapters import base_model_identity, content_hash

    seen = []
    result = run(store, tmp_path, checkpoint, progress=seen.append, created_by="alice")
    assert result.status == "succeeded", result.error
    row = store.adapter(result.version)
    folder = tmp_path / row["path"]
    assert adapter_dirs(tmp_path) == [row["name"]] == [result.name]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert row["content_hash"] == content_hash(folder) and row["name"].startswith(f"v{row['version']}-")
    assert row["base_model"] == base_model_identity(checkpoint)
    assert row["pair_ids_json"] == [p["id"] for p in toy_pairs(16)]
    assert row["config_json"]["learning_rate"] == 5e-3 and row["config_json"]["gate"]["max_new_tokens"] == 8
    # The format that ran, why, and on which CPU: on the version and on the job.
    assert row["config_json"]["dtype"] == row["config_json"]["format"]["dtype"] == "float32"
    assert row["config_json"]["format"]["reason"] == "set explicitly" and row["config_json"]["format"]["cpu"]
    assert row["metrics_json"]["steps"] == 8 and row["metrics_json"]["newest_feedback_utc"]
    assert 0 < row["trainable_share"] < 1 and row["trainable_params"] > 0 and row["train_seconds"] > 0
    assert row["cost_json"]["full_finetune_usd"] > row["cost_json"]["estimated_usd"] > 0
    ev = row["eval_json"]
    assert ev["live_version"] is None and ev["live"]["reward_margin"] == 0  # the base against itself
    assert {c["check"] for c in ev["checks"]} == {"preference accuracy", "reward margin", "behaviour", "regression set",
                                              "fluency", "answer length", "users agree"}
    assert 0 < len(ev["pair_answers"]) <= len(ev["logratios"]) and ev["answered"] > 0  # pairs whose prompt was answered
    assert row["gate_passed"] == int(ev["passed"]) == int(result.gate.passed)
    job = store.job(result.job_id)
    assert (job["status"], job["adapter_version"], job["created_by"]) == ("succeeded", result.version, "alice")
    assert job["progress_json"]["phase"] == "done" and job["pid"] == os.getpid()
    # The console's curves: every step's figures, and when each phase began.
    assert [h["step"] for h in job["progress_json"]["history"]] == list(range(1, 9))
    assert all({"loss", "reward_accuracy", "reward_margin", "seconds"} <= set(h) for h in job["progress_json"]["history"])
    phases = job["progress_json"]["phases"]
    assert [p for p, _ in phases] == ["loading", "training", "saving", "validating", "evaluating", "registering", "done"]
    assert [t for _, t in phases] == sorted(t for _, t in phases)
    assert job["config_json"]["format"]["dtype"] == job["config_json"]["train"]["dtype"] == "float32"
    steps = [r for r in seen if r.get("phase") == "training" and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"loss", "reward_accuracy", "reward_margin"} <= set(r) for r in steps)
    # Anyone can load it with plain peft.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), folder)
    assert model.active_adapter == "default"


def test_the_next_version_is_gated_against_the_live_one(store, tmp_path, checkpoint):
    first = run(store, tmp_path, checkpoint)
    store.record_promotion(first.version, "alice", "test")
    second = run(store, tmp_path, checkpoint, config=FAST.replace(seed=1))
    ev = store.adapter(second.version)["eval_json"]
    assert second.version == first.version + 1 and ev["live_version"] == first.version
    assert ev["live"]["reward_margin"] > 0  # the live adapter was measured, not the base
    assert len(adapter_dirs(tmp_path)) == 2


def test_the_live_versions_answers_and_scores_are_kept_for_the_next_jobs_gate(store, tmp_path, monkeypatch):
    """What the gate asks of the live version (tuning.trainer.Kept) is answered and scored
    once per live version: a second job against the same live version reads its regression
    answers (beside the models), its answers to the held-out prompts and its and the base's
    log-probabilities of the held-out pairs (in the data folder), and gets the same figures;
    new held-out pairs are answered and scored, and only they are kept; a promoted version is
    answered and scored anew. The new version is always answered and scored."""
    from tuning import dpo, generation

    own = save_tiny_checkpoint(tmp_path / "models" / "tiny-chat")  # its own: nothing kept yet
    answered, scored = [], []
    real, real_score = generation.greedy_answers, dpo.token_logps
    monkeypatch.setattr(generation, "greedy_answers", lambda m, t, convs, **kw: answered.append(len(convs)) or real(m, t, convs, **kw))
    monkeypatch.setattr(dpo, "token_logps", lambda m, seqs, *a, **kw: (kw.get("alone") and scored.append(len(seqs)))
                        or real_score(m, seqs, *a, **kw))
    data = tmp_path / "data"
    held_out = lambda: sorted((data / "held-out").iterdir())  # noqa: E731
    first = run(store, data, own)
    # the base (live) answers the regression question and the 4 held-out prompts it reads; the
    # base and the new version score the 8 held-out pairs (16 answers); the live base reads the base's
    assert answered == [1, 4] and scored == [16, 16]
    ev1 = store.adapter(first.version)["eval_json"]
    assert ev1["live"]["reward_margin"] == 0 and ev1["live"]["logratios"] and ev1["reward_margin"] != 0
    assert set(ev1["seconds"]) == {"base log-ratios", "candidate", "live"} and ev1["seconds"]["live"]["log-ratios"] >= 0
    assert len(held_out()) == 2  # the base's scores and its answers to the held-out prompts
    second = run(store, data, own, config=FAST.replace(seed=1))
    assert answered == [1, 4] and scored == [16, 16, 16], "the second job answered or scored the live version again"
    ev2 = store.adapter(second.version)["eval_json"]
    assert ev2["live"]["answers"] == ev1["live"]["answers"] and ev2["live"]["golden"] == ev1["live"]["golden"]
    assert ev2["live"]["logratios"] == ev1["live"]["logratios"]
    # Other held-out pairs (other users' prompts): answered and scored, and only they are kept.
    others = toy_pairs(8, start=200, prefix="f")
    third = train_adapter(toy_pairs(16), others, store=store, data_dir=data, base_model_dir=own, config=FAST,
                          gate_config=GATE)
    assert answered == [1, 4, 4] and scored == [16, 16, 16, 16, 16] and third.status == "succeeded"
    kept_text = "".join(f.read_text() for f in held_out() if f.suffix == ".json")
    assert "question 200?" in kept_text and "question 100?" not in kept_text
    from safetensors.torch import load_file

    assert [len(load_file(f)) for f in held_out() if f.suffix == ".safetensors"] == [16]
    store.record_promotion(first.version, "alice", "test")
    fourth = run(store, data, own, config=FAST.replace(seed=2))
    assert answered == [1, 4, 4, 1, 4] and store.adapter(fourth.version)["eval_json"]["live_version"] == first.version
    assert scored[5:] == [16, 16, 16]  # the base's scores of these pairs again (the third job kept others'), new, live
    assert len(held_out()) == 3  # the base's scores, the live version's scores and answers; the base's answers left
    stored = "".join(f.read_text() for f in (tmp_path / "models" / ".answers").glob("*.json"))
    assert "question 1?" in stored and not [p for p in toy_pairs(8, start=100, prefix="e")
                                            if p["prompt"][-1]["content"] in stored], "users' prompts beside the models"


def test_kept_held_out_answers_that_cannot_be_removed_do_not_fail_the_job(store, tmp_path, checkpoint, monkeypatch, capsys):
    """A data folder where the held-out answers of other pairs cannot be removed (a
    read-only mount, a file held open elsewhere): the job still registers its version and
    says what was left; the next job or preparation removes them."""
    import pathlib

    data = tmp_path / "data"
    first = run(store, data, checkpoint)
    store.record_promotion(first.version, "alice", "test")  # the base's answers are no longer asked: removed
    real = pathlib.Path.unlink

    def refuse(self, missing_ok=False):
        if self.parent.name == "held-out":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", refuse)
    other = run(store, data, checkpoint, config=FAST.replace(seed=1))
    assert other.status == "succeeded" and store.adapter(other.version)["eval_json"]["live_version"] == first.version
    assert "kept held-out answers not tidied" in capsys.readouterr().out
    monkeypatch.undo()
    assert run(store, data, checkpoint, config=FAST.replace(seed=2)).status == "succeeded"
    assert len(list((data / "held-out").iterdir())) == 3  # the base's scores, the live version's scores and answers


def test_kept_answers_are_the_answers_and_only_in_float32(tmp_path, checkpoint, capsys, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.generation import AnswerCache, greedy_answers

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    convs = [[{"role": "user", "content": f"question {i}?"}] for i in range(6)]
    cache = AnswerCache(tmp_path / "kept", {"base": "tiny"})
    direct = greedy_answers(model, tok, convs, max_new_tokens=6)
    assert greedy_answers(model, tok, convs[:4], max_new_tokens=6, cache=cache) == direct[:4]
    assert greedy_answers(model, tok, convs, max_new_tokens=6, cache=cache) == direct  # 4 read, 2 answered
    assert cache.file(6, 0.0) != cache.file(8, 0.0) != cache.file(6, 0.5)
    from tuning import generation

    here = cache.file(6, 0.0)
    monkeypatch.setattr(generation, "answering_code", lambda: "an upgraded answering code")
    assert cache.file(6, 0.0) != here  # an upgrade answers again
    monkeypatch.undo()
    cache.file(6, 0.0).write_text("{not json")
    assert greedy_answers(model, tok, convs, max_new_tokens=6, cache=cache) == direct
    assert "not readable; answering again" in capsys.readouterr().out
    model.to(torch.bfloat16)  # batching changes bf16 answers: nothing kept or read
    other = AnswerCache(tmp_path / "bf16", {"base": "tiny"})
    greedy_answers(model, tok, convs, max_new_tokens=6, cache=other)
    assert not other.folder.exists()


def test_feedback_that_pulls_answers_both_ways_is_trained_registered_and_refused(store, tmp_path, checkpoint):
    # Users 0 and 1 cut every answer to a word; users 2 and 3 say it at four times the length.
    def pulled(pairs):
        for i, p in enumerate(pairs):
            p["user_id"] = f"user{i % 4}"
            long = "yes it is so, yes it is so, yes it is so."
            p["chosen"] = [{"role": "assistant", "content": "yes." if i % 4 < 2 else long}]
            p["rejected"] = [{"role": "assistant", "content": "no it is not so."}]
        return pairs

    result = train_adapter(pulled(toy_pairs(16)), pulled(toy_pairs(8, start=100, prefix="e")), store=store,
                           data_dir=tmp_path, base_model_dir=checkpoint, config=FAST, gate_config=GATE)
    assert result.status == "succeeded" and result.version == 1  # registered: an admin may still promote it
    row = store.adapter(result.version)
    agree = next(c for c in row["eval_json"]["checks"] if c["check"] == "users agree")
    assert not agree["passed"] and not result.gate.passed and row["gate_passed"] == 0
    assert "2 users (12 pairs) cut answers to 0.20x" in agree["detail"]
    assert "2 users (12 pairs) lengthen answers to 2.40x" in agree["detail"]
    assert "users agree" in result.gate.summary()


def test_epochs_auto_is_recorded_as_the_number_that_ran(store, tmp_path, checkpoint):
    result = run(store, tmp_path, checkpoint, config=FAST.replace(epochs="auto"))
    row = store.adapter(result.version)
    assert row["config_json"]["epochs"] == store.job(result.job_id)["config_json"]["train"]["epochs"] == 2
    assert row["metrics_json"]["steps"] == 8  # 16 pairs, 2 epochs of 4


def test_cancel_leaves_nothing_and_says_so(store, tmp_path, checkpoint):
    cancel = threading.Event()
    result = run(store, tmp_path, checkpoint, cancel=cancel,
                 progress=lambda r: cancel.set() if r.get("step") == 2 else None)
    assert result.status == "cancelled" and "step 2" in result.error
    job = store.job(result.job_id)
    assert job["status"] == "cancelled" and "step 2" in job["error"] and job["finished_utc"]
    assert adapter_dirs(tmp_path) == [] and store.adapters() == [] and store.live_version() is None


def test_the_admin_flag_cancels_too(store, tmp_path, checkpoint):
    job_id = store.create_job("admin", {})
    result = run(store, tmp_path, checkpoint, job_id=job_id,
                 progress=lambda r: store.update_job(job_id, cancel_requested=1) if r.get("step") == 1 else None)
    assert result.status == "cancelled" and store.job(job_id)["status"] == "cancelled"
    assert adapter_dirs(tmp_path) == []


def test_a_version_that_fails_validation_is_not_registered(store, tmp_path, checkpoint, monkeypatch):
    from assistant.adapters import InvalidAdapter

    def refuse(*a, **kw):
        raise InvalidAdapter("finite", "lora_B holds NaN or infinite values")

    monkeypatch.setattr("tuning.trainer.validate_adapter", refuse)
    result = run(store, tmp_path, checkpoint)
    assert result.status == "failed" and "(finite)" in result.error
    assert store.job(result.job_id)["error"] == result.error
    assert adapter_dirs(tmp_path) == [] and store.adapters() == []


def test_held_out_pairs_must_not_be_training_pairs(store, tmp_path, checkpoint):
    result = train_adapter(toy_pairs(8), toy_pairs(4), store=store, data_dir=tmp_path, base_model_dir=checkpoint,
                           config=FAST, gate_config=GATE)
    assert result.status == "failed" and "held-out" in result.error


def test_recovery_fails_jobs_of_dead_processes_and_removes_their_leftovers(store, tmp_path):
    dead = store.create_job("cli", {}, status="running")
    store.update_job(dead, pid=999_999_999)
    alive = store.create_job("cli", {}, status="running")
    store.update_job(alive, pid=12345)
    root = tmp_path / "adapters"
    (root / f"{TMP_PREFIX}{dead}-abc").mkdir(parents=True)
    (root / f"{TMP_PREFIX}{alive}-def").mkdir()
    (root / "v7-0123456789ab").mkdir()  # moved into place, never registered
    assert recover_stale_jobs(store, tmp_path, is_ours=lambda job: job["pid"] == 12345) == [dead]
    assert store.job(dead)["status"] == "failed" and "pid 999999999" in store.job(dead)["error"]
    assert store.job(alive)["status"] == "running"
    assert adapter_dirs(tmp_path) == [f"{TMP_PREFIX}{alive}-def"]


@pytest.mark.slow
def test_command_line_ctrl_c_cancels_and_sigkill_is_recovered(tmp_path, checkpoint):
    from store import Store

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(400)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(8, 1000, "e")))
    cmd = [sys.executable, "-m", "tuning.train", "--data-dir", str(tmp_path), "--model", str(checkpoint),
           "--pairs", str(tmp_path / "train.jsonl"), "--eval-pairs", str(tmp_path / "eval.jsonl"),
           "--set", "rank=4", "--set", "dtype=float32", "--set", "batch_size=1", "--set", "epochs=50",
           # 8 replayed answers, not 128: answering 128 at background priority on cores
           # another job shares took past the 120 s below before step 2 (seen once).
           "--set", "replay=8", "--as", "root"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)

    def start_and_wait_for_steps():
        # Started with SIGINT ignored, as a non-interactive shell starts a job in the
        # background (`app.py train ... &` in a script, a CI runner): the job sets its own
        # handler, or Ctrl-C and `kill -INT` would do nothing (found by a CI run so started).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = store.jobs("running")
            if jobs and (jobs[0].get("progress_json") or {}).get("step", 0) >= 2:
                return proc, jobs[0]["id"]
            time.sleep(0.2)
        proc.kill()
        pytest.fail("training did not start: " + proc.communicate()[0][-2000:])

    proc, job_id = start_and_wait_for_steps()
    # A job yields the CPU to serving: it and every thread it started (PyTorch's pool) run
    # under SCHED_IDLE, so a chat's decode step preempts it at once.
    threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
    assert len(threads) > 1 and {os.sched_getscheduler(t) for t in threads} == {os.SCHED_IDLE}
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "step 2/" in out and "reward acc" in out
    assert store.job(job_id)["status"] == "cancelled"
    assert adapter_dirs(tmp_path) == []

    proc, job_id = start_and_wait_for_steps()
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert store.job(job_id)["status"] == "running"
    assert [d for d in adapter_dirs(tmp_path) if not d.startswith(".")] == []  # nothing loadable
    assert recover_stale_jobs(store, tmp_path) == [job_id]
    assert store.job(job_id)["status"] == "failed" and "ended without finishing" in store.job(job_id)["error"]
    assert adapter_dirs(tmp_path) == []


def test_a_full_disk_while_saving_fails_the_job_clearly_and_leaves_nothing(store, tmp_path, checkpoint, monkeypatch):
    import errno

    # A version already live, to show it stays live.
    (tmp_path / "adapters" / "v1-000000000001").mkdir(parents=True)
    store.add_adapter({"version": 1, "name": "v1-000000000001", "content_hash": "1", "base_model": "m",
                       "path": "adapters/v1-000000000001", "gate_passed": 1})
    store.record_promotion(1, "root", "test")
    written = []

    def full_disk(tensors, filename, metadata=None):  # what peft calls to write the weights
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1024)  # part of the file made it to disk
        written.append(filename)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr("peft.peft_model.safe_save_file", full_disk)
    result = run(store, tmp_path, checkpoint)
    assert written and result.status == "failed"
    assert result.error.startswith("the disk is full") and "while saving" in result.error
    assert "nothing was registered" in result.error
    job = store.job(result.job_id)
    assert job["status"] == "failed" and job["error"] == result.error and job["finished_utc"]
    assert adapter_dirs(tmp_path) == ["v1-000000000001"]  # no half-written folder, hidden or not
    assert [a["version"] for a in store.adapters()] == [1] and store.live_version() == 1


def test_continuing_from_a_version_whose_folder_leads_outside_is_refused(store, tmp_path, checkpoint):
    store.add_adapter({"version": 1, "name": "v1-000000000001", "content_hash": "1", "base_model": "m",
                       "path": "adapters/../../elsewhere", "gate_passed": 1})
    result = run(store, tmp_path / "data", checkpoint, config=FAST.replace(continue_from=1))
    assert result.status == "failed" and "(path)" in result.error and "outside" in result.error
    assert [a["version"] for a in store.adapters()] == [1] and adapter_dirs(tmp_path / "data") == []


def test_a_training_process_killed_under_the_running_app_is_failed_and_cleaned_up(store, tmp_path, monkeypatch):
    """The app's launcher watches its training child; SIGKILL there is noticed without a restart."""
    from assistant.config import ServeConfig
    from loop import jobs

    real_popen = subprocess.Popen
    started = []

    def sleeper(cmd, **kw):  # stands in for `python -m tuning.train --job J` stuck halfway
        started.append(cmd)
        return real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kw)

    monkeypatch.setattr(jobs.subprocess, "Popen", sleeper)
    job = store.create_job("root", {}, status="queued")
    proc = jobs.launcher(ServeConfig(data_dir=tmp_path), [], store)(job)
    store.update_job(job, status="running", pid=proc.pid)
    (tmp_path / "adapters" / f"{TMP_PREFIX}{job}-half").mkdir(parents=True)  # what it had written so far
    proc.kill()
    deadline = time.monotonic() + 10
    while (store.job(job)["status"] == "running" or adapter_dirs(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started[0][1:3] == ["-m", "tuning.train"] and jobs.is_training_command(started[0])
    assert started[0][started[0].index("--as") + 1] == "system:launcher" and job in started[0]
    assert store.job(job)["status"] == "failed"
    assert store.job(job)["error"] == f"the training process exited with code {-signal.SIGKILL}"
    assert adapter_dirs(tmp_path) == [] and store.adapters() == []


def test_the_apps_launcher_runs_the_training_module_on_the_queued_job(store, tmp_path):
    """The real command, no stand-in: ``python -m tuning.train --as system:launcher --job J``
    takes the job the console queued (here with no feedback to train on)."""
    from assistant.config import ServeConfig
    from loop import jobs

    job = store.create_job("root", {}, status="queued")
    proc = jobs.launcher(ServeConfig(data_dir=tmp_path, pause_training_at=0), [], store)(job)
    assert proc.wait(timeout=120) == 1
    deadline = time.monotonic() + 10  # the watcher thread reaps it
    while store.job(job)["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    row = store.job(job)
    assert row["status"] == "failed" and row["error"].startswith("not enough preference data")
    assert row["pid"] == proc.pid and row["started_utc"]  # the launched process ran it
    assert "not enough preference data" in (tmp_path / f"train-{job}.log").read_text()


def test_the_apps_launcher_stops_a_job_while_many_answers_stream_and_never_leaves_it_stopped(store, tmp_path, monkeypatch):
    """Under heavy chat load the job is stopped (SIGSTOP) and continued once answers are done,
    when a cancel is asked for, and when the app stops."""
    import psutil

    from assistant.config import ServeConfig
    from loop import jobs
    from test_precision import _wait_for

    real_popen = subprocess.Popen
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda cmd, **kw: real_popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"], **kw))
    streaming, closers = [0], []
    job = store.create_job("root", {}, status="queued")
    launch = jobs.launcher(ServeConfig(data_dir=tmp_path, pause_training_at=3), [], store,
                           streaming=lambda: streaming[0], closers=closers)
    proc = launch(job)
    stopped = lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED  # noqa: E731
    try:
        streaming[0] = 2  # light load: it keeps running
        time.sleep(0.5)
        assert not stopped()
        streaming[0] = 4
        assert _wait_for(stopped), "not stopped under heavy load"
        streaming[0] = 0
        assert _wait_for(lambda: not stopped()), "not continued when the answers were done"
        streaming[0] = 5
        assert _wait_for(stopped)
        for close in closers:  # the app stops while the job is stopped
            close()
        assert _wait_for(lambda: not stopped()), "left stopped behind the app"
    finally:
        proc.kill()
        proc.wait()
    # Ended: its pauser leaves the closers, so they do not grow with every retrain and the
    # app never signals the job's process group (whose id may be reused) at exit.
    assert _wait_for(lambda: closers == []), "an ended job's pauser stayed in the app's closers"


def test_a_long_run_keeps_a_bounded_history_with_its_whole_shape():
    from tuning.trainer import record_step

    history: list[dict] = []
    for step in range(1, 1001):
        history = record_step(history, {"step": step, "steps": 1000, "loss": 1 / step, "nll": 0.5}, limit=50)
    steps = [h["step"] for h in history]
    assert len(history) <= 50 and steps[0] == 1 and steps[-1] == 1000 and steps == sorted(steps)
    assert "nll" not in history[0] and "steps" not in history[0]  # curve values only


def test_answers_prepared_while_idle_are_the_ones_the_next_job_reads(store, tmp_path, monkeypatch, capsys):
    """tuning.prepare answers the replayed questions with the job's starting model (and
    scores them: the replay's reference) and the regression set with the live version, into
    the caches a job reads: the job that follows answers and scores none of them again
    (only its own new version, and held-out prompts the store did not hold), and a
    promotion makes the live version's answers new work for the next prepare."""
    from tuning import generation, sft
    from tuning.prepare import prepare

    own = save_tiny_checkpoint(tmp_path / "models" / "tiny-chat")
    golden, replayed = [], []
    real_greedy, real_replay = generation.greedy_answers, sft.replay_rows
    monkeypatch.setattr(generation, "greedy_answers",
                        lambda m, t, convs, **kw: golden.append(len(convs)) or real_greedy(m, t, convs, **kw))
    monkeypatch.setattr(sft, "replay_rows", lambda *a, **kw: replayed.append(a[2]) or real_replay(*a, **kw))
    scored, real_score = [], sft.with_replay_reference
    monkeypatch.setattr(sft, "with_replay_reference", lambda m, items, *a, **kw: scored.append(len(items)) or real_score(m, items, *a, **kw))
    config, data = FAST.replace(replay=8), tmp_path / "data"
    done = prepare(store, data, own, config, GATE)
    once = [done["replayed"]] if done["replayed"] else []  # scored when there are rows (tests/test_sft.py: kept)
    assert (golden, replayed, scored) == ([1], [8], once) and done["live_version"] is None
    assert (done["regression"], done["format"]) == (1, "float32") and "replayed" in done  # the tiny model's rows may be empty
    assert "regression set: 1 answers of the base model" in capsys.readouterr().out
    assert prepare(store, data, own, config, GATE)["replayed"] == done["replayed"] and (golden, replayed) == ([1], [8])

    # This job's pairs are not in the store, so their held-out prompts (4 read) were not
    # prepared: the job answers them itself (tests/test_trainer.py: the scenario's are).
    first = run(store, data, own, config=config)
    assert first.status == "succeeded" and (golden, replayed, scored) == ([1, 4], [8], once), "the job answered what was prepared"
    store.record_promotion(first.version, "alice", "test")
    assert prepare(store, data, own, config, GATE)["live_version"] == first.version
    assert (golden, replayed) == ([1, 4, 1], [8])  # the new live version's regression answers; the start is the same
    second = run(store, data, own, config=config.replace(seed=1))
    assert store.adapter(second.version)["eval_json"]["live_version"] == first.version
    assert (golden, replayed) == ([1, 4, 1, 4], [8])
    # Another format is another start: the replayed answers are kept by format.
    assert prepare(store, data, own, config.replace(dtype="bfloat16"), GATE)["format"] == "bfloat16"
    assert replayed == [8, 8]


def test_the_pairs_reference_prepared_from_the_store_is_the_one_the_next_job_reads(store, tmp_path, monkeypatch):
    """tuning.prepare also scores both answers of every training pair the store would give a
    job now (the DPO reference), scores the held-out pairs with the base and the live
    version and answers their prompts with the live version, all kept in the data folder;
    the job built from the same store scores none of them again and answers only with its
    own version, and gets the numbers it would have computed itself."""
    from dataclasses import asdict

    from feedback_scenario import build_scenario
    from tuning import dpo, generation, kto
    from tuning.gate import pair_logratios
    from tuning.pairs import build_preferences
    from tuning.prepare import prepare

    own = save_tiny_checkpoint(tmp_path / "models" / "tiny-chat")
    build_scenario(store)
    scored, alone, refs, answered = [], [], [], []
    real_score, real_ref, real_greedy = dpo.token_logps, dpo.with_reference, generation.greedy_answers
    monkeypatch.setattr(dpo, "token_logps", lambda m, seqs, *a, **k: (alone if k.get("alone") else scored).append(len(seqs))
                        or real_score(m, seqs, *a, **k))

    def greedy(m, t, convs, **k):  # counted where generated (a call with a cache generates through another)
        if k.get("cache") is None:
            answered.append(len(convs))
        return real_greedy(m, t, convs, **k)

    monkeypatch.setattr(generation, "greedy_answers", greedy)
    for module in (dpo, kto):  # a job with lone votes too trains both (tuning.kto)
        monkeypatch.setattr(module, "with_reference", lambda *a, **k: refs.append(real_ref(*a, **k)) or refs[-1])
    config, data = FAST.replace(replay=0), tmp_path / "data"
    done = prepare(store, data, own, config, GATE)
    built = build_preferences(store)
    held = [asdict(p) for p in built.eval_pairs]
    prompts = min(len({p["prompt"][-1]["content"] for p in held}), GATE.max_length_prompts)
    assert done["pairs"] >= len(built.train_pairs) > 0 and scored and scored[0] > 0
    assert done["held_out"] == len(held) > 0 and alone == [2 * len(held)] and answered == [1, prompts]
    assert [p.parent.name for p in (data / "references").glob("*.safetensors")] == ["references"]
    assert not list((own.parent).glob("references*")) and not list(own.parent.glob("held-out*")), \
        "users' numbers beside the models"
    job = train_adapter([asdict(p) for p in built.train_pairs], held, store=store,
                        data_dir=data, base_model_dir=own, config=config, gate_config=GATE,
                        votes=[asdict(u) for u in built.train_unpaired], eval_votes=[asdict(u) for u in built.eval_unpaired])
    assert job.status == "succeeded" and len(refs) == 2 and len(scored) == 1, "the job scored prepared pairs again"
    assert alone == [2 * len(held)] * 2, "the job scored the base's held-out pairs again (only its new version's)"
    assert answered == [1, prompts], "the job answered the base's held-out prompts again"
    from tuning.trainer import build_model

    model, tok = build_model(own, config)
    fresh = real_ref(model, dpo.pair_items(tok, [asdict(p) for p in built.train_pairs], config), dpo.pad_id(tok), False)
    assert [x for it in refs[1][: len(fresh)] for x in it.ref] == pytest.approx([x for it in fresh for x in it.ref], abs=1e-4)
    live = store.adapter(job.version)["eval_json"]["live"]  # the base's, read from what was prepared
    assert live["logratios"] == pytest.approx(pair_logratios(model, tok, held, adapter_off=True)[0], abs=1e-3)


def test_the_app_answers_ahead_once_per_live_version_and_never_beside_a_job(store, tmp_path, monkeypatch):
    """loop.jobs.Preparer runs the real ``python -m tuning.prepare`` for the tiny model: once
    when nothing was prepared, not again for the same live version unless 32 votes and edits
    arrived since, never while a job is queued or running (a running one is stopped when a
    job appears), again when the live version changes."""
    from assistant.config import ServeConfig
    from loop import jobs

    own = save_tiny_checkpoint(tmp_path / "models" / "tiny-chat")
    prep = jobs.Preparer(ServeConfig(data_dir=tmp_path, model=str(own), pause_training_at=0),
                         ["dtype=float32", "replay=4"], store)
    assert prep.poll() and prep._proc.wait(timeout=180) == 0, (tmp_path / "prepare.log").read_text()
    log = (tmp_path / "prepare.log").read_text()
    assert "regression set: " in log and "the base model" in log and "priority: background" in log
    assert list((tmp_path / "models" / ".answers").glob("*.json")) and list((tmp_path / "models" / ".replay").glob("*.json"))
    last = prep.status()["last"]  # what the console shows: the record tuning.prepare kept
    assert not prep.status()["running"] and last["live_version"] is None and last["format"] == "float32"
    assert last["regression"] == len(GateConfig().golden) and last["finished_utc"] > prep._at
    assert not prep.poll() and prep.started == [None]  # the same live version: nothing to do
    # Feedback grew since it started: again, so the new pairs' reference is scored ahead too.
    counted = []
    monkeypatch.setattr(store, "feedback_count_since", lambda since: counted.append(since) or 31)
    assert not prep.poll() and counted == [prep._at] and prep.started == [None]
    monkeypatch.setattr(store, "feedback_count_since", lambda since: 32)
    real_command = prep.command
    monkeypatch.setattr(prep, "command", lambda: [sys.executable, "-c", "pass"])
    assert prep.poll() and prep.started == [None, None] and prep._proc.wait(timeout=30) == 0
    monkeypatch.setattr(store, "feedback_count_since", lambda since: 0)
    monkeypatch.setattr(prep, "command", real_command)

    job = store.create_job("root", {}, status="queued")
    monkeypatch.setattr(store, "live_version", lambda: 7)  # a promotion, seen while the job is active
    assert not prep.poll() and prep.started == [None, None]
    store.update_job(job, status="failed", error="test")
    monkeypatch.setattr(prep, "command", lambda: [sys.executable, "-c", "import time; time.sleep(120)"])
    assert prep.poll() and prep.started == [None, None, 7] and prep.running()
    assert prep.status()["running"] and prep.status()["for_version"] == 7 and prep.status()["last"] == last
    running = store.create_job("root", {}, status="running")  # a job from the command line: it answers itself
    assert not prep.poll() and not prep.running() and prep._proc.returncode == -signal.SIGTERM
    store.update_job(running, status="failed", error="test")
    assert not prep.poll()  # tried once for this live version
    # Under chat load it is stopped like a job; once it ended, nothing signals its pid again.
    quick = jobs.Preparer(ServeConfig(data_dir=tmp_path, model=str(own), pause_training_at=3), [], store)
    monkeypatch.setattr(quick, "command", lambda: [sys.executable, "-c", "pass"])
    assert quick.poll() and quick._pauser is not None
    quick._proc.wait(timeout=30)
    assert not quick.poll() and quick._pauser is None


def test_answers_prepared_ahead_stop_when_the_app_that_started_them_is_gone(tmp_path):
    """The prepare process runs in its own session, out of reach of signals to the app's
    group; with ``--parent`` it ends when that process ends, even killed outright."""
    import psutil

    from test_precision import _wait_for

    parent = subprocess.Popen([sys.executable, "-c", """
import os, subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", f"import tuning.prepare as t, time; t._exit_with({os.getpid()}); "
                      "print('watching', flush=True); time.sleep(60)"], start_new_session=True)
print(p.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "watching" and psutil.pid_exists(child)
    parent.kill()
    parent.wait()
    assert _wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
