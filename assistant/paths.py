"""What lives where in the data folder (``--data-dir``): each path is written here once.

    paths = DataPaths(data_dir)
    Store(paths.database)                 # the SQLite file
    paths.adapters / name                 # where a new version's folder goes
    paths.version_folder(store.adapter(v))  # a registered version's folder, checked

It sits in ``assistant/`` rather than ``store/`` because serving needs it too (the
configuration's database path, the adapters folder the zero base adapter is written to)
and ``assistant/`` may import nothing of the other packages, while ``tuning/``, ``loop/``
and ``app.py`` may all import ``assistant/``. The store itself takes only a file path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapters import InvalidAdapter


@dataclass(frozen=True)
class DataPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def database(self) -> Path:
        return self.root / "assistant.db"

    @property
    def adapters(self) -> Path:
        """Registered versions (``v{N}-{hash12}``), the zero base adapter and, hidden behind a
        dot, jobs' folders still being written (so the final move is one rename)."""
        return self.root / "adapters"

    @property
    def models(self) -> Path:
        """Prepared base models, unless the app is given another folder (``--models-dir``)."""
        return self.root / "models"

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
