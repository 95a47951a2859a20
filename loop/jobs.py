"""Training jobs seen from the app: launch one, watch it, recover those that died, cancel.

``launcher`` starts a queued job as its own process, ``python -m tuning.train --as
system:launcher --job J`` (a crash or a cancel there never touches the chat; its progress
reaches the console through the job's row), and a watcher thread reaps it and fails the job
if it died without saying so. ``recover_stale_jobs`` fails jobs left running by a process
that is gone or silent and removes what they left; ``cancel`` asks a job to stop.

Is a job alive? A job row records the pid of its process, when it started
(``started_utc``) and its last heartbeat (``heartbeat_utc``, written after every step and
by a timer in the training process, ``tuning.heartbeat``). A pid alone proves nothing:
after a reboot or a container restart it may belong to any process. So a process counts as
the job's only when it exists, was created no later than the job started (a reused pid
belongs to a process created after the job's own died) and its command line is a training
command (``is_training_command``). Only such a process is ever signalled.

With several app replicas on one PostgreSQL database a job may run on another machine
(its row's ``host``): a pid proves nothing here, so such a job is judged by its heartbeat
alone, and a job another machine queued is not this app's to fail at start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import psutil

from assistant.paths import DataPaths
from store.rows import utc_now
from tuning.heartbeat import HEARTBEAT_S

ROOT = Path(__file__).resolve().parent.parent  # where ``python -m tuning.train`` resolves

# A job silent for this long has a process that is gone, frozen or not ours: ten missed
# beats (10 min), so a database busy for a few minutes (each beat gives up after the 15 s
# busy timeout) does not fail a healthy job.
STALE_AFTER = dt.timedelta(seconds=10 * HEARTBEAT_S)
# psutil derives start times from the boot time, which Linux gives in whole seconds.
_CLOCK_SLACK_S = 1.0
# This machine, as jobs' rows name it (tuning.train records the same).
HOST = socket.gethostname()


def elsewhere(job: dict) -> bool:
    """Whether the job was queued on or runs on another machine (rows before hosts: here)."""
    return job.get("host") not in (None, HOST)


def _time(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts) if ts else None


def last_sign_of_life(job: dict) -> dt.datetime | None:
    return _time(job.get("heartbeat_utc") or job.get("started_utc") or job.get("created_utc"))


def is_stale(job: dict, now: dt.datetime | None = None) -> bool:
    last = last_sign_of_life(job)
    now = now or dt.datetime.now(dt.timezone.utc)
    return last is None or now - last > STALE_AFTER


def job_process(job: dict) -> psutil.Process | None:
    """The job's process if it provably is ours and alive, else None."""
    pid, started = job.get("pid"), _time(job.get("started_utc"))
    if not pid or started is None:
        return None
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        cmdline = proc.cmdline()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if created > started.timestamp() + _CLOCK_SLACK_S:
        return None  # created after the job started: the pid was reused
    if not is_training_command(cmdline):
        return None
    return proc


def is_training_command(cmdline: list[str]) -> bool:
    """``python -m tuning.train ...`` (what the launcher runs), or ``python .../app.py ...
    train ...`` (what an admin types, and what the launcher ran before)."""
    for i, part in enumerate(cmdline):
        if part == "-m" and cmdline[i + 1 : i + 2] == ["tuning.train"]:
            return True
        if Path(part).name == "app.py":
            return "train" in cmdline[i + 1 :]
    return False


def end_job(store: Any, job: dict, status: str, error: str, process: psutil.Process | None) -> None:
    """Mark the job ended and raise its cancel flag (a frozen trainer that wakes up stops at
    its next step); SIGTERM ``process`` only when ``job_process`` proved it ours."""
    store.update_job(job["id"], status=status, error=error, cancel_requested=1, finished_utc=utc_now())
    if process is not None:
        try:
            process.send_signal(signal.SIGTERM)  # the trainer treats it as Ctrl-C: a clean stop
            process.resume()  # a job stopped while chats streamed must run to act on it
        except psutil.Error:
            pass  # gone meanwhile


def silence(job: dict) -> str:
    return (f"no heartbeat for more than {int(STALE_AFTER.total_seconds() // 60)} min "
            f"(last {job.get('heartbeat_utc') or 'never'})")


def cancel(store: Any, job: dict, actor: str) -> None:
    """Ask an active job to stop: raise its flag, which the trainer polls between steps and
    stops, leaving nothing behind. A running job whose process is silent has nobody left to
    read the flag (gone, frozen, or its pid another process's now): it is ended here, and
    only a proven trainer is signalled."""
    store.update_job(job["id"], cancel_requested=1)
    if job["status"] == "running" and is_stale(job):
        end_job(store, job, "cancelled", f"cancelled by {actor}: its process sent {silence(job)}", job_process(job))


# -- recovery ------------------------------------------------------------------------------


def recover_stale_jobs(store: Any, data_dir: Path, is_ours: Callable[[dict], bool] | None = None) -> list[str]:
    """Fail jobs left 'running' by a process that is gone, not ours, or silent, and remove
    what they left in adapters/.

    Run at app start, before each launch, when a launched process ends without finishing
    its job, and by ``app.py train``. A running job is failed when its pid is not provably
    its training process (``job_process``: dead, or reused by a process created after the
    job started) or when it sent no heartbeat for ``STALE_AFTER``; a silent process that is
    provably ours is sent SIGTERM, any other process is left alone. Then
    ``tuning.trainer.remove_leftovers``. Returns the ids of the jobs marked failed.
    """
    from tuning.trainer import remove_leftovers

    failed = []
    for job in store.jobs("running"):
        if elsewhere(job):  # another replica's machine: its pid means nothing here
            if is_stale(job):
                end_job(store, job, "failed", f"the training process on {job['host']} sent {silence(job)}; "
                        "nothing was registered", None)
                failed.append(job["id"])
            continue
        process = job_process(job) if is_ours is None else None
        ours = process is not None if is_ours is None else is_ours(job)
        stale = is_stale(job)
        if (job.get("pid") == os.getpid() or ours) and not stale:
            continue
        if stale and ours:
            why = f"the training process (pid {job.get('pid')}) sent {silence(job)}; it was stopped"
        else:
            why = (f"the training process (pid {job.get('pid')}) ended without finishing (killed or crashed, or "
                   f"the pid now belongs to another process; last heartbeat {job.get('heartbeat_utc')})")
        end_job(store, job, "failed", why + "; nothing was registered", process)
        failed.append(job["id"])
    remove_leftovers(store, data_dir)
    return failed


def recover_at_start(store: Any, data_dir: Path) -> list[str]:
    """What the app does with jobs as it starts: fail those left running by a process that
    died (``recover_stale_jobs``, whose ids it returns) and those queued by an app that
    stopped before launching them."""
    failed = recover_stale_jobs(store, data_dir)
    for job in store.jobs("queued"):
        if elsewhere(job):
            continue  # another replica queued it and is starting it
        store.update_job(job["id"], status="failed", error="the app stopped before this job started")
    return failed


# -- launch and watch ----------------------------------------------------------------------


def launcher(config: Any, train_set: list[str], store: Any, streaming: Callable[[], int] = lambda: 0,
             closers: list | None = None) -> Callable[[str], subprocess.Popen]:
    """``launch(job_id)``: start ``python -m tuning.train --as system:launcher --job J`` for a
    queued job, with the app's model options and database (``config``: an
    ``assistant.config.ServeConfig``; the database URL goes in $ASSISTANT_DATABASE) and ``train_set`` (``--set KEY=VALUE`` items), its output in ``DATA_DIR/train-J.log``.

    The job yields the CPU to chats: it runs at background priority (tuning.priority), and
    while ``streaming()`` answers (all users) reach ``config.pause_training_at`` it is
    stopped outright (``PauseWhileBusy``), and continued when they are done, when a cancel
    is asked for, and when the app stops (``closers``, which it leaves once the job ended)."""
    from store.actors import LAUNCHER
    from tuning.priority import PauseWhileBusy

    def launch(job_id: str) -> subprocess.Popen:
        # A job that died since the app started (an admin's, say) must not leave its folders behind.
        for failed in recover_stale_jobs(store, config.data_dir):
            print(f"training job {failed} was left running by a process that died: marked failed", flush=True)
        cmd = app_command("tuning.train", config, train_set, "--as", LAUNCHER, "--job", job_id)
        proc = start_in_background(cmd, config, Path(config.data_dir) / f"train-{job_id}.log", "wb")
        pauser = None
        if config.pause_training_at > 0:
            pauser = PauseWhileBusy(proc.pid, lambda: streaming() >= config.pause_training_at,
                                    must_run=lambda: bool(store.job(job_id).get("cancel_requested"))).start()
            if closers is not None:
                closers.append(pauser.stop)  # never leave a job stopped behind the app
        threading.Thread(target=_watch, args=(proc, job_id, store, config.data_dir, pauser, closers),
                         daemon=True, name=f"train-{job_id}").start()
        return proc

    return launch


def app_command(module: str, config: Any, train_set: list[str], *args: str) -> list[str]:
    """``python -m MODULE --data-dir D ARGS --models-dir M [--model X] [--set K=V ...]``: a
    process working for the app on its data folder, models and job settings."""
    cmd = [sys.executable, "-m", module, "--data-dir", str(config.data_dir), *args,
           "--models-dir", str(config.models_dir)]
    if config.model:
        cmd += ["--model", config.model]
    for item in train_set:
        cmd += ["--set", item]
    return cmd


def start_in_background(cmd: list[str], config: Any, log_path: Path, mode: str) -> subprocess.Popen:
    """Start ``cmd`` in its own session (the app's Ctrl-C does not reach it) from the
    project's root, its output appended to or written over ``log_path`` (``mode``), the
    database URL in its environment."""
    from assistant.paths import DATABASE_ENV

    env = None
    if config.database:  # in the environment, not the command line: ps would show a password
        env = dict(os.environ, **{DATABASE_ENV: config.database})
    with open(log_path, mode) as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)


def _watch(proc: subprocess.Popen, job_id: str, store: Any, data_dir: Path, pauser, closers: list | None) -> None:
    """Reap the job's process; fail the job if it ended without saying so."""
    code = proc.wait()
    if pauser is not None:
        pauser.stop()
        if closers is not None and pauser.stop in closers:
            closers.remove(pauser.stop)  # ended: nothing to continue at exit (its pid may be reused)
    if store.job(job_id)["status"] in ("queued", "running"):
        store.update_job(job_id, status="failed", error=f"the training process exited with code {code}")
        recover_stale_jobs(store, data_dir)  # removes what it left half-written


_NOTHING_YET = object()


class Preparer:
    """Answers ahead what the next job answers first (``tuning.prepare``): when the app
    starts and whenever the live version changes, while no job is queued or running, it
    starts ``python -m tuning.prepare`` at background priority (stopped outright while
    ``streaming()`` reaches ``config.pause_training_at``, like a job), its output in
    ``DATA_DIR/prepare.log``. A job that starts meanwhile stops it (``stop``); what it had
    answered stays kept and the job answers the rest. ``poll`` is called by the control
    loop (``loop.control.Controller.tick``); it does nothing while one is running and
    tries once per live version, whatever the outcome (the job answers what is missing),
    and again once ``new_feedback`` votes and edits arrived since the last one started: the
    pairs' reference (``tuning.dpo.ReferenceCache``) then scores only what is new."""

    def __init__(self, config: Any, train_set: list[str], store: Any, streaming: Callable[[], int] = lambda: 0,
                 new_feedback: int = 32):
        self.config, self.train_set, self.store, self.streaming = config, list(train_set), store, streaming
        self.new_feedback = new_feedback
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pauser = None
        self._for: Any = _NOTHING_YET  # the live version the last one was started for
        self._at: str | None = None  # when the last one started (UTC)
        self.started: list = []  # the live versions prepared for, in order

    def command(self) -> list[str]:
        return app_command("tuning.prepare", self.config, self.train_set, "--parent", str(os.getpid()))

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> bool:
        """Start one if the live version changed since the last, or feedback grew by
        ``new_feedback``, and no job is active; True if it did."""
        from loop.control import ACTIVE

        with self._lock:
            if self.running():
                if any(self.store.jobs(s) for s in ACTIVE):  # a job from the command line: it answers itself
                    self._stop_locked()
                return False
            if self._pauser is not None:  # it ended: its pid is no longer its to signal
                self._pauser.stop()
                self._pauser = None
            live = self.store.live_version()
            grown = self._at is not None and self.store.feedback_count_since(self._at) >= self.new_feedback
            if (live == self._for and not grown) or any(self.store.jobs(s) for s in ACTIVE):
                return False
            self._for, self._at = live, utc_now()
            self.started.append(live)
            self._proc = start_in_background(self.command(), self.config, Path(self.config.data_dir) / "prepare.log", "ab")
            if self.config.pause_training_at > 0:
                from tuning.priority import PauseWhileBusy

                self._pauser = PauseWhileBusy(self._proc.pid,
                                              lambda: self.streaming() >= self.config.pause_training_at).start()
            return True

    def status(self) -> dict:
        """What the admin console shows: whether one runs now (``paused`` while users chat),
        since when and for which live version, and what the last one to finish did
        (``last``: ``DATA_DIR/prepared.json``, written by ``tuning.prepare``; None when none
        finished or the file is not readable)."""
        with self._lock:
            running = self.running()
            status = {"running": running, "paused": bool(running and self._pauser is not None and self._pauser.paused),
                      "started_utc": self._at, "for_version": None if self._for is _NOTHING_YET else self._for}
        try:
            last = json.loads(DataPaths(self.config.data_dir).prepared.read_text())
            if dt.datetime.fromisoformat(last["finished_utc"]).tzinfo is None:
                raise ValueError("not a UTC time")
        except (OSError, ValueError, TypeError, KeyError):  # none yet, or damaged: shown as none
            last = None
        return {**status, "last": last}

    def stop(self) -> None:
        """Stop a running one (a job is about to start, or the app stops) and wait for it."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._pauser is not None:
            self._pauser.stop()  # continued first: a stopped process cannot act on SIGTERM
            self._pauser = None
        if self.running():
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
