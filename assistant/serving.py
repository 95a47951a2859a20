"""Which adapter version answers: the live-version pointer, promotion and rollback.

``AdapterRouter.adapter_for(user)`` returns the live ``Adapter`` (None: the base model).
``ChatService`` calls it once at the start of a request and passes that adapter to the
engine, so a request that started on version N finishes on N whatever happens meanwhile.

``promote(version)`` validates and loads the version if the engine does not hold it yet,
then moves the pointer in one assignment: every request that starts after the call
returns gets the new version, and none waits for the load. The previous live version
stays loaded (a rollback is one pointer move, no load); older ones are unloaded, and the
engine defers each unload until that version's last request has finished.

``set_canary(adapter, share, key)`` serves a candidate to a sticky share of users.
Promotions recorded by another process reach the router through
``loop.control.Controller.sync`` (the app's control loop).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters import validate_adapter
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


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry knows of a version: where it is and what its content must hash to."""

    adapter: Adapter
    content_hash: str


def record_from_row(row: dict, data_dir: Path) -> AdapterRecord:
    """An ``adapters`` table row (store.Store.adapter) -> AdapterRecord; paths are data-dir relative."""
    path = Path(row["path"])
    path = path if path.is_absolute() else Path(data_dir) / path
    return AdapterRecord(Adapter(row["name"], str(path.resolve()), row["version"]), row["content_hash"])


class AdapterRouter:
    def __init__(
        self,
        engine: Engine,
        lookup: Callable[[int], AdapterRecord],
        *,
        base_shapes: dict[str, tuple[int, ...]],
        max_rank: int,
        keep: int = 2,  # live + previous: a rollback needs no load
    ):
        self.engine = engine
        self.lookup = lookup
        self.base_shapes = base_shapes
        self.max_rank = max_rank
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

    @property
    def live(self) -> Adapter | None:
        return self._live

    @property
    def canary(self) -> tuple[Adapter | None, float, str]:
        return self._canary

    def loaded_versions(self) -> list[int]:
        held = set(self._recent) | {self._canary[0]}
        return sorted(a.version for a in held if a is not None)

    # -- promotion -----------------------------------------------------------------

    def promote(self, version: int | None) -> Adapter | None:
        """Make ``version`` (None: the base model) live; returns the adapter now serving."""
        adapter = None
        if version is not None:
            record = self.lookup(version)
            adapter = record.adapter
            if adapter not in self._recent and adapter != self._canary[0]:
                # Check the folder is what the registry recorded before any engine sees it.
                validate_adapter(
                    Path(adapter.path), base_shapes=self.base_shapes, max_rank=self.max_rank,
                    expected_hash=record.content_hash,
                )
        self.set_live(adapter)
        return adapter

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
                    self.engine.unload_adapter(old.name)  # deferred until its requests finish
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

    def close(self) -> None:
        pass
