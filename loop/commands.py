"""What the command line does for admins (app.py parses the arguments and calls these).

Each command works on the data folder's database, so it needs no running server: a
promotion recorded here reaches a running server within its control loop's poll interval.
Whoever can run these can read the data folder anyway, so the acting admin is named with
``--as NAME`` (recorded with every change) rather than asked for a password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from assistant.adapters import base_model_identity, base_weight_shapes

from .control import Controller
from .versions import resolve_version


class _NoEngine:
    """The command line changes the record; the serving process applies it."""

    def set_live(self, adapter) -> None:
        pass

    def set_canary(self, adapter, share, key) -> None:
        pass


def controller(store: Any, data_dir: Path, model_dir: Path, max_rank: int) -> Controller:
    shapes = base_weight_shapes(model_dir)
    base = base_model_identity(model_dir)

    def adapter_of(version: int):
        return resolve_version(store, data_dir, version, base_shapes=shapes, base_model=base, max_rank=max_rank)

    def no_launch(job_id: str) -> None:
        raise RuntimeError("use the train command to run training from the command line")

    return Controller(store, _NoEngine(), adapter_of, no_launch)


def versions_table(store: Any) -> str:
    live = store.live_version()
    canary = store.latest_promotion("canary")
    rates = {r["version"]: r for r in store.thumbs_up_by_version()}
    lines = ["version\tstatus\tgate\tpairs\tpref_acc\tmargin\tthumbs_up\tname"]
    for v in [None] + [a["version"] for a in store.adapters()]:
        a = store.adapter(v) if v is not None else {}
        ev = a.get("eval_json") or {}
        status = "live" if v == live else "canary" if canary and canary["share"] > 0 and canary["version"] == v else "-"
        r = rates.get(v) or {}
        rate = f"{r['rate']:.2f} ({r['up'] + r['down']})" if r.get("rate") is not None else "-"
        gate = "-" if v is None else ("passed" if a.get("gate_passed") else "failed")
        lines.append("\t".join(str(x) for x in (
            "base" if v is None else f"v{v}", status, gate, len(a.get("pair_ids_json") or []),
            ev.get("preference_accuracy", "-"), ev.get("reward_margin", "-"), rate, a.get("name", "-"),
        )))
    return "\n".join(lines)


def parse_version(text: str) -> int | None:
    """'base' or 'v3' or '3'; anything else (a path, a name) is refused, never looked up."""
    text = text.strip().lower()
    if text in ("base", "none", "0"):
        return None
    if not re.fullmatch(r"v?[0-9]+", text):
        raise ValueError(f"{text!r} is not a version: give v3, 3 or base (versions are numbers, never paths).")
    return int(text.lstrip("v"))
