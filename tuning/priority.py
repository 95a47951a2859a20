"""Training yields the CPU to serving: chats stay fast while a retrain runs on the same machine.

Retraining on the serving machine is the design, and on two cores a training job at normal
priority halved single-chat speed and more (an AVX2 EPYC: 58 -> 22.8 tok/s for four chats
in float32). ``yield_cpu_to_serving`` puts the calling process under Linux's SCHED_IDLE
policy: it runs only on CPU time that no normal process wants, so every decode step of the
vLLM server preempts it at once, and it takes the whole machine back between chats. Where
SCHED_IDLE is missing (macOS) it falls back to nice 19. Threads started afterwards (PyTorch's
OpenMP pool) inherit the policy, so call it before the first torch operation.

Even a job that only fills the gaps between decode steps cost 8 continuous chats a third
of their throughput (bench/busy_bench.py: 0.65x with the job running idle, 1.0x with it
stopped). So ``PauseWhileBusy`` also stops the job's process group (SIGSTOP) while many
answers stream at once, and continues it (SIGCONT) when they are done. With users who pause
between messages, chats then keep their full speed and the job runs 1.2x slower than alone;
under chats that never pause, the job waits (docs/figures.md, "Serving while training").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

POLICIES = ("background", "normal")


def yield_cpu_to_serving() -> str:
    """Lower this process to the idle scheduling class; returns what was applied.

    Every thread it has so far (an import may have started a native pool, e.g. OpenBLAS's)
    and, by inheritance, every thread started after."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            except (ProcessLookupError, PermissionError):
                pass  # ended meanwhile
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        try:
            os.nice(19 - os.nice(0))
            return "nice 19"
        except OSError:
            return "unchanged"


def apply(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"priority must be one of {', '.join(POLICIES)}, not {policy!r}")
    return yield_cpu_to_serving() if policy == "background" else "unchanged"


class PauseWhileBusy:
    """Stop a training job's process group while ``busy()``, continue it when it is not.

    ``pgid``: the job's process group (the launcher starts it in a session of its own).
    The job is continued once ``busy()`` has been false for ``calm_s``; and however busy
    serving stays, after ``max_pause_s`` stopped it runs for ``run_s``, so its heartbeat
    (tuning.heartbeat) goes on and the job is never taken for dead. ``must_run()`` (checked
    about once a second; e.g. "a cancel was asked for") continues it for good, so it can
    see the request and stop. ``stop()`` always leaves the job running.
    """

    def __init__(self, pgid: int, busy: Callable[[], bool], *, must_run: Callable[[], bool] = lambda: False,
                 calm_s: float = 0.5, max_pause_s: float = 50.0, run_s: float = 3.0, poll_s: float = 0.05):
        self.pgid, self.busy, self.must_run = pgid, busy, must_run
        self.calm_s, self.max_pause_s, self.run_s, self.poll_s = calm_s, max_pause_s, run_s, poll_s
        self.paused = False
        self.pauses = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pause-job-{pgid}")

    def start(self) -> "PauseWhileBusy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> bool:
        try:
            os.killpg(self.pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _run(self) -> None:
        last_busy = paused_at = run_until = checked = 0.0
        while not self._done.wait(self.poll_s):
            now = time.monotonic()
            if now - checked >= 1.0:
                checked = now
                try:
                    if self.must_run():
                        break
                except Exception:  # a busy database: ask again next second
                    pass
            busy = self.busy()
            if busy:
                last_busy = now
            if not self.paused:
                if busy and now >= run_until:
                    if not self._signal(signal.SIGSTOP):
                        return  # the job is gone
                    self.paused, paused_at = True, now
                    self.pauses += 1
            elif now - last_busy >= self.calm_s:
                self._signal(signal.SIGCONT)
                self.paused = False
            elif now - paused_at >= self.max_pause_s:  # stopped long enough: let it beat
                self._signal(signal.SIGCONT)
                self.paused, run_until = False, now + self.run_s
        self._signal(signal.SIGCONT)
        self.paused = False
