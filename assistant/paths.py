"""What lives where in the data folder (``--data-dir``): each path is written here once.

    paths = DataPaths(data_dir)
    Store(paths.database)                 # the SQLite file
    paths.adapters / name                 # where a new version's folder goes
    paths.version_folder(store.adapter(v))  # a registered version's folder, checked

It sits in ``assistant/`` rather than ``store/`` because serving needs it too (the
configuration's database path, the adapters folder the zero base adapter is written to)
and ``assistant/`` may import nothing of the other packages, while ``tuning/``, ``loop/``
and ``app.py`` may all import ``assistant/``. The store itself takes only a file path,
or a postgresql:// URL: ``--database`` (or $ASSISTANT_DATABASE) names one instead of the
file here, so several app replicas can share it (``database_target``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .adapters import InvalidAdapter

# The environment variable every entry point reads --database's default from; the launcher
# hands the app's database to a training process this way, never on its command line,
# where a password in the URL would show in ``ps``.
DATABASE_ENV = "ASSISTANT_DATABASE"


def database_option() -> str | None:
    """``--database``'s default: $ASSISTANT_DATABASE, or None (the file in the data folder)."""
    return os.environ.get(DATABASE_ENV) or None


@dataclass(frozen=True)
class DataPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def database(self) -> Path:
        return self.root / "assistant.db"

    def database_target(self, chosen: str | None = None) -> str | Path:
        """What ``store.Store`` opens: ``chosen`` (``--database``: a postgresql:// URL or a
        SQLite file) when given, else the SQLite file in this folder."""
        return chosen or self.database

    @property
    def adapters(self) -> Path:
        """Registered versions (``v{N}-{hash12}``), the zero base adapter and, hidden behind a
        dot, jobs' folders still being written (so the final move is one rename)."""
        return self.root / "adapters"

    @property
    def models(self) -> Path:
        """Prepared base models, unless the app is given another folder (``--models-dir``)."""
        return self.root / "models"

    @property
    def references(self) -> Path:
        """The reference's log-probabilities of the pairs' answers, kept for the next job
        (``tuning.dpo.ReferenceCache``): numbers from users' answers, so here, not beside
        the models."""
        return self.root / "references"

    @property
    def held_out(self) -> Path:
        """What the gate keeps of the live version (or the base) on the held-out pairs for
        the next job: its answers to their prompts and its log-probabilities of their answers
        (``tuning.trainer.Kept``); from users' prompts, so here."""
        return self.root / "held-out"

    @property
    def prepared(self) -> Path:
        """What ``tuning.prepare`` last did ahead for the next job (counts, seconds, when):
        the admin console shows it."""
        return self.root / "prepared.json"

    def version_folder(self, row: dict) -> Path:
        """The folder of a registered version (an ``adapters`` row), resolved. Its recorded
        path must lead directly into the adapters folder: one that leads anywhere else
        (absolute, ``..``, or through a symlink) raises InvalidAdapter, so no row can make
        the app load or train on a folder outside it."""
        root = self.adapters.resolve()
        folder = (self.root / row["path"]).resolve()
        if folder.parent != root:
            raise InvalidAdapter("path", f"version {row['version']} points outside {root}")
        return folder
