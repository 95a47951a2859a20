"""Is a training job still alive, and is its pid still our process? Recovery and cancel ask here.

A job row records the pid of its process, when it started (``started_utc``) and its last
heartbeat (``heartbeat_utc``, written after every step and by a timer in the trainer,
``tuning.heartbeat``). A pid
alone proves nothing: after a reboot or a container restart it may belong to any process.
So a process counts as the job's only when it exists, was created no later than the job
started (a reused pid belongs to a process created after the job's own died) and its
command line is a training command. Only such a process is ever signalled.
"""

from __future__ import annotations

import datetime as dt
import signal
from typing import Any

import psutil

from tuning.heartbeat import HEARTBEAT_S

# A job silent for this long has a process that is gone, frozen or not ours: ten missed
# beats (10 min), so a database busy for a few minutes (each beat gives up after the 15 s
# busy timeout) does not fail a healthy job.
STALE_AFTER = dt.timedelta(seconds=10 * HEARTBEAT_S)
# psutil derives start times from the boot time, which Linux gives in whole seconds.
_CLOCK_SLACK_S = 1.0


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
    if not any("train" in part for part in cmdline):
        return None  # `app.py train` or `python -m tuning.train`; anything else is not a job
    return proc


def is_ours(job: dict) -> bool:
    return job_process(job) is not None


def end_job(store: Any, job: dict, status: str, error: str, process: psutil.Process | None) -> None:
    """Mark the job ended and raise its cancel flag (a frozen trainer that wakes up stops at
    its next step); SIGTERM ``process`` only when ``job_process`` proved it ours."""
    from store.store import utc_now

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
