"""Which adapter version answers: the live-version pointer, promotion and rollback.

``AdapterRouter.adapter_for(user)`` returns the live ``Adapter`` (None: the base model).
``ChatService`` calls it once at the start of a request and passes that adapter to the
engine, so a request that started on version N finishes on N whatever happens meanwhile.

``promote(version)`` validates and loads the version if the engine does not hold it yet,
then moves the pointer in one assignment: every request that starts after the call
returns gets the new version, and none waits for the load. The previous live version
stays loaded (a rollback is one pointer move, no load); older ones are unloaded, and the
engine defers each unload until that version's last request has finished.

``follow(live_version)`` polls the store's promotions so a promotion recorded by another
process (an admin command, the training pipeline) reaches this server within a second.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters import validate_adapter
from .engine import Adapter, Engine

log = logging.getLogger(__name__)


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
        self._promote_lock = threading.Lock()
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()

    # -- reading -------------------------------------------------------------------

    def adapter_for(self, user_id: str) -> Adapter | None:
        """The adapter that answers ``user_id`` now (everyone gets the live version)."""
        return self._live  # one reference read: atomic, never a half-swapped state

    @property
    def live(self) -> Adapter | None:
        return self._live

    def loaded_versions(self) -> list[int]:
        return sorted(a.version for a in self._recent if a is not None)

    # -- promotion -----------------------------------------------------------------

    def promote(self, version: int | None) -> Adapter | None:
        """Make ``version`` (None: the base model) live; returns the adapter now serving."""
        with self._promote_lock:
            adapter = None
            if version is not None:
                record = self.lookup(version)
                adapter = record.adapter
                if adapter not in self._recent:
                    # Check the folder is what the registry recorded before any engine sees it.
                    validate_adapter(
                        Path(adapter.path), base_shapes=self.base_shapes, max_rank=self.max_rank,
                        expected_hash=record.content_hash,
                    )
                    self.engine.load_adapter(adapter)
            self._live = adapter  # the swap
            self._recent = [adapter] + [a for a in self._recent if a != adapter]
            for old in self._recent[self.keep:]:
                if old is not None:
                    self.engine.unload_adapter(old.name)  # deferred until its requests finish
            self._recent = self._recent[: self.keep]
            log.info("live version is now %s", "base" if adapter is None else adapter.name)
            return adapter

    def follow(self, live_version: Callable[[], int | None], interval_s: float = 0.5) -> None:
        """Promote whatever ``live_version()`` says, now and whenever it changes."""
        self.promote(live_version())

        def poll() -> None:
            refused: int | None = None  # a version that failed: not retried every poll
            while not self._stop.wait(interval_s):
                want = None
                try:
                    want = live_version()
                    have = self._live.version if self._live else None
                    if want != have and want != refused:
                        self.promote(want)
                except Exception:  # a bad version must not stop the server following
                    refused = want
                    log.exception("could not promote version %s; still serving the previous one", want)

        self._follower = threading.Thread(target=poll, daemon=True, name="live-version")
        self._follower.start()

    def close(self) -> None:
        self._stop.set()
