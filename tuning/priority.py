"""Training yields the CPU to serving: chats stay fast while a retrain runs on the same machine.

Retraining on the serving machine is the design, and on two cores a training job at normal
priority halved single-chat speed and more (an AVX2 EPYC: 58 -> 22.8 tok/s for four chats
in float32). ``yield_cpu_to_serving`` puts the calling process under Linux's SCHED_IDLE
policy: it runs only on CPU time that no normal process wants, so every decode step of the
vLLM server preempts it at once, and it takes the whole machine back between chats. Where
SCHED_IDLE is missing (macOS) it falls back to nice 19. Threads started afterwards (PyTorch's
OpenMP pool) inherit the policy, so call it before the first torch operation.

The trade-off, measured in bench/busy_bench.py (docs/figures.md): chats keep nearly their
quiet speed; the job advances only in the gaps between chats, so under chats that never
pause it waits.
"""

from __future__ import annotations

import os

POLICIES = ("background", "normal")


def yield_cpu_to_serving() -> str:
    """Lower this process to the idle scheduling class; returns what was applied."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
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
