"""Stale training jobs: recovery and cancel judge a job by its heartbeat and by whether its
pid is provably still our training process, and never signal a process that is not."""

import datetime as dt
import signal
import subprocess
import sys
import time

import pytest

from assistant.engine import Adapter
from loop.control import Controller
from loop.jobs import STALE_AFTER, is_training_command, job_process, recover_stale_jobs


def ago(**kw) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(**kw)).isoformat()


@pytest.fixture
def processes():
    """Real processes; each is killed at the end if still running."""
    started = []

    def start(*args):
        time.sleep(0.05)  # so a job stamped before this call started strictly before the process
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])
        started.append(proc)
        time.sleep(0.3)  # let the interpreter start, so its command line is readable
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def running_job(store, pid, started, heartbeat):
    job = store.create_job("root", {}, status="running")
    store.update_job(job, pid=pid, started_utc=started, heartbeat_utc=heartbeat)
    return job


def test_a_job_whose_pid_now_belongs_to_another_process_is_failed_and_that_process_left_alone(
        store, tmp_path, processes):
    # After a reboot or a container restart the job's pid is reused by an unrelated process,
    # started after the job was. Its heartbeat is only a minute old: the pid decides.
    job = running_job(store, 0, ago(minutes=5), ago(minutes=1))
    unrelated = processes("an unrelated service, also a 'train' station")
    store.update_job(job, pid=unrelated.pid)
    assert job_process(store.job(job)) is None
    assert recover_stale_jobs(store, tmp_path) == [job]
    row = store.job(job)
    assert row["status"] == "failed" and f"pid {unrelated.pid}" in row["error"] and row["cancel_requested"] == 1
    time.sleep(0.2)
    assert unrelated.poll() is None  # never signalled


def test_only_a_training_command_counts_as_a_jobs_process(store, processes):
    # What the launcher runs now, and what it ran before (a job of an app started before the
    # change, still running) and admins type: both are ours once older than their job.
    launched = processes("-m", "tuning.train", "--data-dir", "d", "--as", "system:launcher", "--job", "J1")
    old_form = processes("/srv/assistant/app.py", "--data-dir", "d", "train", "--as", "system:launcher", "--job", "J2")
    # Older than the job too, and "train" is in their command lines, but they train nothing.
    station = processes("an unrelated service, also a 'train' station")
    tests = processes("-m", "pytest", "tests/test_trainer.py")
    other_app_command = processes("app.py", "--data-dir", "d", "versions")
    started = ago(seconds=0)
    assert [job_process(store.job(running_job(store, p.pid, started, started))) is not None
            for p in (launched, old_form, station, tests, other_app_command)] == [True, True, False, False, False]
    assert not is_training_command(["python", "-m", "tuning.trainer"])
    assert not is_training_command(["python", "-m"])


def test_a_silent_job_of_ours_is_failed_and_stopped_and_a_live_one_kept(store, tmp_path, processes):
    silent = processes("-m", "tuning.train", "--job", "J1")
    busy = processes("app.py", "train", "--job", "J2")
    before = ago(seconds=0)  # a job starts after its process does
    stale = running_job(store, silent.pid, before, ago(minutes=STALE_AFTER.total_seconds() / 60 + 1))
    fresh = running_job(store, busy.pid, before, ago(seconds=30))
    assert job_process(store.job(stale)).pid == silent.pid  # provably ours: older than the job
    assert recover_stale_jobs(store, tmp_path) == [stale]
    assert store.job(stale)["status"] == "failed" and "no heartbeat for more than 10 min" in store.job(stale)["error"]
    assert silent.wait(timeout=10) == -signal.SIGTERM  # ours and stuck: asked to stop
    assert store.job(fresh)["status"] == "running" and busy.poll() is None


def test_another_machines_job_is_judged_by_its_heartbeat_alone(store, tmp_path, processes):
    """Replicas on one PostgreSQL database: a job running on another machine has a pid that
    means nothing here (here it is an unrelated process, or none); only its silence ends it,
    and a job another machine queued is not failed by this app's start."""
    from loop.jobs import recover_at_start

    unrelated = processes("an unrelated service")
    lively = running_job(store, unrelated.pid, ago(minutes=5), ago(seconds=20))
    store.update_job(lively, host="gpu-box-2")
    assert recover_at_start(store, tmp_path) == [] and store.job(lively)["status"] == "running"
    store.update_job(lively, heartbeat_utc=ago(minutes=STALE_AFTER.total_seconds() / 60 + 1))
    assert recover_stale_jobs(store, tmp_path) == [lively]
    assert "on gpu-box-2 sent no heartbeat" in store.job(lively)["error"]
    time.sleep(0.2)
    assert unrelated.poll() is None  # never signalled
    theirs = store.queue_job("root", {}, host="gpu-box-2")
    recover_at_start(store, tmp_path)
    assert store.job(theirs)["status"] == "queued"
    store.update_job(theirs, status="cancelled")
    ours = store.queue_job("root", {})  # queued here (or before hosts were recorded): its app stopped
    recover_at_start(store, tmp_path)
    assert store.job(ours)["status"] == "failed"


class _Router:
    def set_live(self, adapter):
        pass

    def set_canary(self, adapter, share, key):
        pass


def test_cancel_ends_a_stale_job_at_once_without_signalling_a_process_that_is_not_ours(store, processes):
    store.create_user("root", "root-password", is_admin=True)
    c = Controller(store, _Router(), adapter_of=lambda v: Adapter(f"v{v}", "/a", v), launcher=lambda j: None)
    job = running_job(store, 0, ago(hours=3), ago(hours=2))
    unrelated = processes("something else")
    store.update_job(job, pid=unrelated.pid)
    c.cancel("root", job)
    row = store.job(job)
    assert row["status"] == "cancelled" and "no heartbeat" in row["error"] and row["finished_utc"]
    time.sleep(0.2)
    assert unrelated.poll() is None
    assert c.retrain("root")  # no longer refused

    mine = processes("app.py", "train", "--job", "J3")
    store.update_job(job, status="cancelled")
    lively = store.jobs("queued")[0]["id"]
    store.update_job(lively, status="running", pid=mine.pid, started_utc=ago(seconds=0), heartbeat_utc=ago(seconds=5))
    c.cancel("root", lively)  # alive and reporting: the trainer stops itself between steps
    assert store.job(lively)["status"] == "running" and store.job(lively)["cancel_requested"] == 1
    assert mine.poll() is None


def test_the_trainer_beats_in_phases_without_steps(store, tmp_path, monkeypatch):
    from tiny import toy_pairs
    from tuning.trainer import train_adapter

    monkeypatch.setattr("tuning.heartbeat.HEARTBEAT_S", 0.05)
    beats = []

    def progress(row):  # called as the job enters its first phase, before any step
        job = store.jobs("running")[0]
        first = job["heartbeat_utc"]
        time.sleep(0.5)  # a long model load, say
        beats.append((first, store.job(job["id"])["heartbeat_utc"]))
        raise RuntimeError("stop here: the beats are what this test is about")

    result = train_adapter(toy_pairs(4), toy_pairs(2, start=100, prefix="e"), store=store, data_dir=tmp_path,
                           base_model_dir=tmp_path / "no-model", progress=progress)
    (first, later), = beats
    assert later > first and result.status == "failed"
