"""Who acted, when no person did: the app's own actors, names no account can hold.

Promotions and jobs record an actor. A person's actor is their user name, which
``users.NAME_RE`` allows no ':' in; the app's own actions are recorded as ``system:<what>``,
so no account can be, or pass itself off as, one of them. Rows written before this
prefix name the same actors without it ("scheduler", "canary-monitor", "startup-check");
they still read as they did, and new accounts may not take those names either, so such a
row keeps meaning the app.
"""

from __future__ import annotations

SYSTEM_PREFIX = "system:"
SCHEDULER = "system:scheduler"  # scheduled retraining (loop.control.Controller.tick)
CANARY_MONITOR = "system:canary-monitor"  # the automatic rollback of a canary clearly worse than live
STARTUP_CHECK = "system:startup-check"  # a live or canary folder that no longer validates at start
LAUNCHER = "system:launcher"  # the app starting the training process of a job it queued
# The actors' names in rows written before the prefix; refused as user names.
LEGACY_NAMES = frozenset({"scheduler", "canary-monitor", "startup-check"})


def is_system(actor: str | None) -> bool:
    """Whether ``actor`` is one of the app's own (no account can have such a name)."""
    return bool(actor) and actor.startswith(SYSTEM_PREFIX)
