"""From a registered version number to an adapter an engine may load.

The only way a folder reaches an engine: the version's row gives a path inside the data
folder's adapters/ directory (never a path anyone typed), and the folder must pass
``assistant.adapters.validate_adapter`` with the hash recorded at registration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from assistant.adapters import InvalidAdapter, check_name, validate_adapter
from assistant.engine import Adapter
from assistant.paths import DataPaths


def resolve_version(
    store: Any,
    data_dir: Path,
    version: int,
    *,
    base_shapes: dict[str, tuple[int, ...]],
    base_model: str,
    max_rank: int,
) -> Adapter:
    """Validate version ``version`` and return it for serving; InvalidAdapter says why not."""
    row = store.adapter(version)
    check_name(row["name"])
    if row["base_model"] != base_model:
        raise InvalidAdapter("base model", f"v{version} was trained on {row['base_model']}, this server runs {base_model}")
    folder = DataPaths(data_dir).version_folder(row)
    validate_adapter(folder, base_shapes=base_shapes, max_rank=max_rank, expected_hash=row["content_hash"])
    return Adapter(row["name"], str(folder), version)
