"""The loop in the hands of admins: retrain, promote, canary, roll back, on a schedule too.

``Controller`` is what the admin console and the command line call. Every action takes the
acting user and refuses non-admins here, on the server side, whatever the page shows. The
loop's own actions (scheduled retraining, the canary's automatic rollback, the start-up
check) go through private methods and are recorded as ``store.actors`` system actors, which
no account can hold: no user name passes itself off as the app.
Training runs in a separate process (``launcher``) so a crash or a cancel never takes the
chat down; its progress reaches the console through the job's row in the store.
Promotion and rollback are recorded (who, when, why), then flip the serving router's live
adapter: effective for the next request, with no reload. Rollback goes only to versions
that were live before.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from assistant.adapters import InvalidAdapter
from assistant.engine import Adapter
from store.actors import CANARY_MONITOR, SCHEDULER, STARTUP_CHECK

from . import jobs
from .canary import CanaryConfig, CanaryVerdict, compare


class Refused(PermissionError):
    """The actor may not do this (not an admin)."""


class Conflict(RuntimeError):
    """The action clashes with the current state (a job already runs, a gate failed...)."""


class Router(Protocol):
    def set_live(self, adapter: Adapter | None) -> None: ...

    def set_canary(self, adapter: Adapter | None, share: float, key: str) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    # Scheduled retraining is off by default: a new version should be an admin's decision
    # until they trust the gate. Either trigger alone starts a job.
    retrain_min_new_feedback: int | None = None
    retrain_every_hours: float | None = None
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    # How often the background thread syncs promotions made elsewhere (the command line,
    # another replica on the same PostgreSQL database), checks the canary and the
    # schedule: a few cheap reads. 1 s so a promotion anywhere serves everywhere within 2 s.
    poll_seconds: float = 1.0


ACTIVE = ("queued", "running")


def _name(version: int | None) -> str:
    return "the base model" if version is None else f"v{version}"


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts) if ts else None


class Controller:
    def __init__(
        self,
        store: Any,
        router: Router,
        adapter_of: Callable[[int], Adapter],
        launcher: Callable[[str], Any],
        config: LoopConfig = LoopConfig(),
        preparer: Any = None,
    ):
        """``adapter_of(version)`` validates a registered version and returns it for serving;
        ``launcher(job_id)`` starts the training process for a queued job; ``preparer``
        (``loop.jobs.Preparer``, optional) answers ahead what the next job answers first."""
        self.store = store
        self.router = router
        self.adapter_of = adapter_of
        self.launcher = launcher
        self.config = config
        self.preparer = preparer
        self._lock = threading.RLock()  # one state change at a time
        self._stop = threading.Event()
        self._applied: tuple | None = None  # ids of the promotions the router reflects

    # -- permissions -----------------------------------------------------------------

    def require_admin(self, actor: str | None) -> str:
        if not actor or not self.store.is_admin(actor):
            raise Refused("This action needs an admin account.")
        return actor

    # -- training --------------------------------------------------------------------

    def retrain(self, actor: str, overrides: dict | None = None) -> str:
        """Queue and launch a training job; refused while another one is queued or running,
        or when a setting is one the job would refuse at its start (a rank serving refuses)."""
        return self._retrain(self.require_admin(actor), overrides)

    def _retrain(self, actor: str, overrides: dict | None) -> str:
        """``retrain`` for an actor already allowed: an admin, or the schedule (``tick``)."""
        from store import JobConflict

        from tuning.config import TrainConfig

        try:  # the settings the job reads from its row (tuning.train), checked before it is queued
            TrainConfig().replace(**{k: v for k, v in (overrides or {}).items() if k in TrainConfig.__dataclass_fields__})
        except ValueError as e:
            raise Conflict(str(e)) from e
        try:
            job_id = self.store.queue_job(actor, overrides or {}, host=jobs.HOST)  # atomic across replicas
        except JobConflict as e:
            raise Conflict(str(e)) from e
        if self.preparer is not None:
            self.preparer.stop()  # the job answers what it had not answered yet
        try:
            self.launcher(job_id)
        except Exception as e:
            self.store.update_job(job_id, status="failed", error=f"could not start: {e}")
            raise
        return job_id

    def cancel(self, actor: str, job_id: str) -> None:
        self.require_admin(actor)
        job = self.store.job(job_id)
        if job["status"] not in ACTIVE:
            raise Conflict(f"Job {job_id} is {job['status']}; there is nothing to cancel.")
        jobs.cancel(self.store, job, actor)

    # -- serving ---------------------------------------------------------------------

    def promote(self, actor: str, version: int | None, reason: str = "", *, override: bool = False) -> None:
        """Make a version (None: the base model) live for every user from the next request.

        Recorded first, switched second: a write the database refuses (locked, disk full)
        leaves serving as it was, so the log never says one version while another serves.
        A switch that fails after the record (the engine refuses the load) is undone by
        one more row putting the previous version back, with the reason (the log is
        append-only), and the error is raised.
        """
        self.require_admin(actor)
        if version is not None:
            row = self.store.adapter(version)
            if not row["gate_passed"] and not self._was_live(version):
                if not override:
                    raise Conflict(f"Version {version} did not pass the evaluation gate; override it with a reason to promote anyway.")
                if not reason.strip():
                    raise Conflict("Overriding the gate needs a reason, recorded with your name.")
        with self._lock:
            adapter = None if version is None else self.adapter_of(version)  # validated before any record
            before = self.store.live_version()
            self.store.record_promotion(version, actor, reason, gate_override=override)
            try:
                self.router.set_live(adapter)
            except Exception as e:
                self.store.record_promotion(
                    before, actor, f"undone: {_name(version)} was recorded live but could not be served ({e}); "
                                   f"{_name(before)} kept serving")
                self._applied = self._log_state()
                raise
            canary = self.store.latest_promotion("canary")
            if canary and canary["share"] > 0 and canary["version"] == version:
                self.store.record_promotion(version, actor, "promoted to live", kind="canary", share=0.0)
                self.router.set_canary(None, 0.0, "")
            self._applied = self._log_state()

    def rollback(self, actor: str, version: int | None, reason: str = "") -> None:
        """Go back to a version that was live before, or the base model: one click, no gate.

        A version that never served is not a rollback target: making it live is a
        promotion, which needs the gate or an override with a reason.
        """
        self.require_admin(actor)
        if version is not None and not self._was_live(version):
            raise Conflict(f"v{version} was never live, so there is nothing to roll back to; promote it instead "
                           "(that needs the evaluation gate, or an override with a reason).")
        self.promote(actor, version, reason or "rollback")

    def _was_live(self, version: int) -> bool:
        return any(p["version"] == version for p in self.store.promotions() if p["kind"] == "live")

    def start_canary(self, actor: str, version: int, share: float, reason: str = "") -> None:
        self.require_admin(actor)
        if not 0 < share < 1:
            raise Conflict("A canary share is between 0 and 1 (for example 0.1 for 10% of users).")
        with self._lock:
            adapter = self.adapter_of(version)
            pid = self.store.record_promotion(version, actor, reason, kind="canary", share=share)
            try:
                self.router.set_canary(adapter, share, pid)
            except Exception as e:  # as in promote: the log must say what serves
                self.store.record_promotion(version, actor, f"undone: the canary could not be served ({e})",
                                            kind="canary", share=0.0)
                self._applied = self._log_state()
                raise
            self._applied = self._log_state()

    def stop_canary(self, actor: str, reason: str = "") -> None:
        self._stop_canary(self.require_admin(actor), reason)

    def _stop_canary(self, actor: str, reason: str) -> None:
        """``stop_canary`` for an actor already allowed: an admin, or the canary monitor."""
        with self._lock:
            current = self.store.latest_promotion("canary")
            if not current or current["share"] <= 0:
                return
            self.store.record_promotion(current["version"], actor, reason, kind="canary", share=0.0)
            self.router.set_canary(None, 0.0, "")  # after the record, as in promote
            self._applied = self._log_state()

    def canary_verdict(self) -> tuple[dict | None, CanaryVerdict | None]:
        current = self.store.latest_promotion("canary")
        if not current or current["share"] <= 0:
            return None, None
        live = self.store.live_version()
        counts = {r["version"]: r for r in self.store.thumbs_up_by_version(since_utc=current["created_utc"])}
        lv, cv = counts.get(live, {}), counts.get(current["version"], {})
        verdict = compare(lv.get("up", 0), lv.get("down", 0), cv.get("up", 0), cv.get("down", 0), self.config.canary)
        return current, verdict

    def check_canary(self) -> CanaryVerdict | None:
        """Roll the canary back by itself when it is clearly worse than live."""
        current, verdict = self.canary_verdict()
        if verdict is not None and verdict.clearly_worse:
            self._stop_canary(CANARY_MONITOR, "automatic rollback: " + verdict.summary())
        return verdict

    def _log_state(self) -> tuple:
        return tuple((p or {}).get("id") for p in (self.store.latest_promotion("live"), self.store.latest_promotion("canary")))

    def restore(self) -> None:
        """After a restart: serve what the log says was live, and resume a running canary."""
        with self._lock:
            state = self._log_state()
            live = self.store.live_version()
            self.router.set_live(None if live is None else self.adapter_of(live))
            canary = self.store.latest_promotion("canary")
            if canary and canary["share"] > 0:
                self.router.set_canary(self.adapter_of(canary["version"]), canary["share"], canary["id"])
            else:
                self.router.set_canary(None, 0.0, "")
            self._applied = state

    def start(self) -> list[str]:
        """``restore`` at app start, when the folders may have changed while nobody served.

        A live version whose folder no longer validates is rolled back, in the log, to the
        newest earlier live version that does (or the base model), and a canary that no longer
        validates is stopped: the app serves, and admins see who (``STARTUP_CHECK``) and why.
        Returns one warning per change.
        """
        warnings: list[str] = []
        with self._lock:
            try:
                self.restore()  # the usual start: every folder validates, each checked once
                return warnings
            except InvalidAdapter:
                pass
            canary = self.store.latest_promotion("canary")
            if canary and canary["share"] > 0:
                try:
                    self.adapter_of(canary["version"])
                except InvalidAdapter as e:
                    why = f"canary v{canary['version']} stopped at start: {e}"
                    self.store.record_promotion(canary["version"], STARTUP_CHECK, why, kind="canary", share=0.0)
                    warnings.append(why)
            live = self.store.live_version()
            if live is not None:
                try:
                    self.adapter_of(live)
                except InvalidAdapter as e:
                    fallback = self._last_good_live(exclude=live)
                    why = (f"automatic rollback at start from v{live} to "
                           f"{'the base model' if fallback is None else f'v{fallback}'}: {e}")
                    self.store.record_promotion(fallback, STARTUP_CHECK, why)
                    warnings.append(why)
            self.restore()
        return warnings

    def _last_good_live(self, exclude: int) -> int | None:
        """The newest earlier live version whose folder still validates; None: the base."""
        seen = {exclude}
        for p in self.store.promotions():
            v = p["version"]
            if p["kind"] != "live" or v in seen:
                continue
            if v is None:
                return None
            seen.add(v)
            try:
                self.adapter_of(v)
                return v
            except InvalidAdapter:
                continue
        return None

    def sync(self) -> bool:
        """Apply promotions another process (the command line) recorded; True if any."""
        state = self._log_state()
        if state == self._applied:
            return False
        try:
            self.restore()
        except Exception:
            # Keep serving what was live; do not retry the same bad state every poll.
            self._applied = state
            raise
        return True

    # -- schedule --------------------------------------------------------------------

    def due(self, now: dt.datetime | None = None) -> str | None:
        """Why a scheduled retrain is due now, or None."""
        c = self.config
        if c.retrain_min_new_feedback is None and c.retrain_every_hours is None:
            return None
        now = now or dt.datetime.now(dt.timezone.utc)
        jobs = self.store.jobs()
        last = _parse(jobs[0]["created_utc"]) if jobs else None
        if c.retrain_min_new_feedback is not None:
            new = self.store.feedback_count_since(last.isoformat() if last else None)
            if new >= c.retrain_min_new_feedback:
                return f"{new} new pieces of feedback since the last job"
        if c.retrain_every_hours is not None and (last is None or now - last >= dt.timedelta(hours=c.retrain_every_hours)):
            return f"{c.retrain_every_hours} h since the last job"
        return None

    def tick(self) -> str | None:
        """One round of the background loop: sync, canary check, scheduled retraining, then
        answering ahead for the next job (``preparer``) while none is due or active."""
        self.sync()
        self.check_canary()
        reason = self.due()
        if reason and not any(self.store.jobs(s) for s in ACTIVE):
            try:
                return self._retrain(SCHEDULER, {"trigger": reason})
            except Conflict:
                return None
        if self.preparer is not None:
            self.preparer.poll()
        return None

    def run_forever(self) -> threading.Thread:
        """Two background threads, each every ``poll_seconds``: one follows the promotion
        log (``sync``), so a promotion made by another replica or the command line serves
        here within 2 s whatever else is slow; the other runs ``tick`` (the canary's
        statistics, whose first scipy import took a second here, and the schedule).
        Returns the second."""

        def every(step: Callable[[], Any], name: str) -> threading.Thread:
            def loop():
                while not self._stop.wait(self.config.poll_seconds):
                    try:
                        step()
                    except Exception as e:  # keep the loop alive; the console shows job errors
                        print(f"{name}: {e}", flush=True)

            t = threading.Thread(target=loop, name=name, daemon=True)
            t.start()
            return t

        every(self.sync, "live-pointer")
        return every(self.tick, "control loop")

    def stop(self) -> None:
        self._stop.set()
