"""Adapter versions, training jobs and promotions: the registry half of the store.

Mixed into ``store.Store``; kept apart so each file reads in one sitting.
"""

from __future__ import annotations

from typing import Any

from .errors import NotFound
from .rows import canonical_json, decode_json, encode_json, new_id, utc_now


class JobConflict(RuntimeError):
    """A training job is already queued or running: one job at a time."""

    def __init__(self, job: dict):
        super().__init__(f"Training job {job['id']} is still {job['status']}; wait or cancel it.")
        self.job = job


class RegistryMixin:
    db: Any  # provided by Store
    _write: Any  # Store's BEGIN IMMEDIATE transaction

    # -- adapter versions ------------------------------------------------------------

    def next_adapter_version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM adapters").fetchone()
        return (row[0] or 0) + 1

    def add_adapter(self, row: dict) -> int:
        """Record a validated adapter version; ``row`` has the adapters table's columns."""
        row = encode_json(row)
        row.setdefault("created_utc", utc_now())
        self.db["adapters"].insert(row)
        return row["version"]

    def update_adapter(self, version: int, **changes: Any) -> None:
        if not self.db["adapters"].count_where("version = ?", [version]):
            raise NotFound(f"No adapter version {version}.")
        self.db["adapters"].update(version, encode_json(changes))

    def adapter(self, version: int) -> dict:
        rows = list(self.db["adapters"].rows_where("version = ?", [version]))
        if not rows:
            raise NotFound(f"No adapter version {version}.")
        return decode_json(rows[0])

    def adapters(self) -> list[dict]:
        return [decode_json(r) for r in self.db["adapters"].rows_where(order_by="version")]

    # -- training jobs ---------------------------------------------------------------

    def create_job(self, created_by: str, config: dict, status: str = "queued", host: str | None = None) -> str:
        job_id = new_id()
        self.db["training_jobs"].insert(
            {
                "id": job_id,
                "status": status,
                "created_by": created_by,
                "config_json": canonical_json(config),
                "progress_json": "{}",
                "created_utc": utc_now(),
                "host": host,
            }
        )
        return job_id

    def queue_job(self, created_by: str, config: dict, host: str | None = None) -> str:
        """Queue a job unless one is queued or running (JobConflict then): the check and the
        insert are one transaction holding the write lock, so two starts (the console, the
        scheduler, ``app.py train``, another replica's) can never both get a job and race
        for a version number. ``host``: the machine that will run it (``loop.jobs.HOST``)."""
        with self._write() as db:
            active = db.execute(
                "SELECT id, status FROM training_jobs WHERE status IN ('queued', 'running') "
                "ORDER BY created_utc LIMIT 1").fetchone()
            if active:
                raise JobConflict({"id": active[0], "status": active[1]})
            return self.create_job(created_by, config, status="queued", host=host)

    def update_job(self, job_id: str, **changes: Any) -> None:
        if not self.db["training_jobs"].count_where("id = ?", [job_id]):
            raise NotFound(f"No training job {job_id!r}.")
        self.db["training_jobs"].update(job_id, encode_json(changes))

    def job(self, job_id: str) -> dict:
        rows = list(self.db["training_jobs"].rows_where("id = ?", [job_id]))
        if not rows:
            raise NotFound(f"No training job {job_id!r}.")
        return decode_json(rows[0])

    def jobs(self, status: str | None = None) -> list[dict]:
        where, params = ("status = ?", [status]) if status else (None, [])
        return [
            decode_json(r)
            for r in self.db["training_jobs"].rows_where(where, params, order_by="created_utc DESC")
        ]

    # -- promotions ------------------------------------------------------------------

    def record_promotion(
        self,
        version: int | None,
        actor: str,
        reason: str = "",
        *,
        kind: str = "live",
        share: float = 1.0,
        gate_override: bool = False,
    ) -> str:
        """Make ``version`` (None: the base model) live, or a canary with ``share`` of users."""
        if version is not None:
            self.adapter(version)  # raises NotFound
        pid = new_id()
        self.db["promotions"].insert(
            {
                "id": pid,
                "kind": kind,
                "version": version,
                "share": share,
                "actor": actor,
                "reason": reason,
                "gate_override": int(gate_override),
                "created_utc": utc_now(),
            }
        )
        return pid

    def latest_promotion(self, kind: str = "live") -> dict | None:
        # The database's own order of writes (rowid), not the writers' clocks: two app
        # replicas on one database whose clocks differ by a second would otherwise let an
        # older promotion win over a newer one.
        rows = list(self.db["promotions"].rows_where("kind = ?", [kind], order_by="rowid DESC", limit=1))
        return rows[0] if rows else None

    def live_version(self) -> int | None:
        """The adapter version serving users now; None is the base model."""
        row = self.latest_promotion("live")
        return None if row is None else row["version"]

    def promotions(self) -> list[dict]:
        return list(self.db["promotions"].rows_where(order_by="rowid DESC"))
