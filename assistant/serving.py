"""Which adapter answers whom: the live-version pointer and the canary.

``AdapterRouter.adapter_for(user)`` returns the adapter that answers ``user`` now (None: the
base model): the canary for its share of users (``in_canary``), else the live version.
``ChatService`` and the OpenAI-compatible API call it once at the start of a request and
pass that adapter to the engine, so a request that started on version N finishes on N
whatever happens meanwhile.

The router validates and records nothing. Its one caller that changes it is
``loop.control.Controller``: ``promote`` and ``rollback`` (from the admin page, or recorded
by ``app.py promote|rollback`` and applied by ``Controller.sync``) validate the version with
``loop.versions.resolve_version``, record the promotion in the store, then call
``set_live``; ``start_canary``/``stop_canary`` call ``set_canary``; ``restore`` calls both at
start. ``set_live(adapter)`` loads the adapter if the engine does not hold it yet, then
moves the pointer in one assignment: every request that starts after the call returns gets
the new version, and none waits for the load. The previous live version stays loaded (a
rollback is one pointer move, no load); older ones are unloaded, which ``VLLMEngine``
defers until that version's last streaming request has ended. A running canary's adapter
stays loaded whatever the live version does.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from .engine import Adapter, Engine

log = logging.getLogger(__name__)


def in_canary(user_id: str, canary_key: str, share: float) -> bool:
    """True for about ``share`` of users, decided by a hash of (canary, user): stable across
    requests and restarts, independent between canaries, and no state to store."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{canary_key}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class AdapterRouter:
    def __init__(self, engine: Engine, *, keep: int = 2):  # keep live + previous: a rollback needs no load
        self.engine = engine
        self.keep = keep
        self._live: Adapter | None = None
        self._recent: list[Adapter | None] = [None]  # newest first; None is the base model
        self._canary: tuple[Adapter | None, float, str] = (None, 0.0, "")
        self._promote_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------

    def adapter_for(self, user_id: str) -> Adapter | None:
        """The adapter that answers ``user_id`` now: the canary for its share of users
        (sticky per user), else the live version. One reference read each: a request never
        sees a half-swapped state."""
        canary, share, key = self._canary
        if canary is not None and in_canary(user_id, key, share):
            return canary
        return self._live

    # -- changing (loop.control.Controller only) ----------------------------------

    def _ensure_loaded(self, adapter: Adapter | None) -> None:
        if adapter is not None and adapter not in self._recent and adapter != self._canary[0]:
            self.engine.load_adapter(adapter)

    def set_live(self, adapter: Adapter | None) -> None:
        """Serve an already validated adapter (None: the base model) to every user not in a
        canary, from the next request on: load first, then swap the pointer."""
        with self._promote_lock:
            self._ensure_loaded(adapter)
            self._live = adapter  # the swap
            self._recent = [adapter] + [a for a in self._recent if a != adapter]
            for old in self._recent[self.keep:]:
                if old is not None and old != self._canary[0]:
                    self.engine.unload_adapter(old.name)  # VLLMEngine: once its last request ends
            self._recent = self._recent[: self.keep]
            log.info("live version is now %s", "base" if adapter is None else adapter.name)

    def set_canary(self, adapter: Adapter | None, share: float, key: str) -> None:
        """Serve ``adapter`` to ``share`` of users (picked by hashing ``key`` with the user
        id); None or share 0 ends the canary."""
        with self._promote_lock:
            if adapter is None or share <= 0:
                adapter, share, key = None, 0.0, ""
            self._ensure_loaded(adapter)
            old = self._canary[0]
            self._canary = (adapter, share, key)  # the swap
            if old is not None and old != adapter and old not in self._recent:
                self.engine.unload_adapter(old.name)
            log.info("canary is now %s", "off" if adapter is None else f"{adapter.name} for {share:.0%}")
