"""A training job's heartbeat: the job's row says it is alive, in every phase.

The writer runs in the training process (``tuning.trainer.train_adapter``, and
``tuning.train`` while it builds pairs); the app judges the beats (``loop.jobs``: a job
silent for ten beats is taken for dead).
"""

from __future__ import annotations

import threading
from typing import Any

# The trainer beats at least this often, in every phase (a timer, not only after steps),
# so a long model load or gate evaluation never looks silent.
HEARTBEAT_S = 60.0


def start_heartbeat(store: Any, job_id: str) -> threading.Event:
    """Write the job's heartbeat every HEARTBEAT_S until the returned event is set."""
    from store.rows import utc_now

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                store.update_job(job_id, heartbeat_utc=utc_now())
            except Exception:  # a busy database skips a beat; staleness needs ten
                pass

    threading.Thread(target=beat, daemon=True, name=f"heartbeat-{job_id}").start()
    return stop
