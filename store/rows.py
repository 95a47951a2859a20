"""The forms values take in the database's rows: ids, times, JSON and the prompt hash.

Every mixin of ``store.Store`` imports these at the top, and code outside the store that
writes the same kind of value (a job's heartbeat time, a prompt's hash) imports them
from here, so a value means the same wherever it was made. Rows written years ago hold
these forms: ``answers.prompt_hash`` is compared across old and new rows, so changing a
form here changes what the app does with data it already has (tests/test_rows.py pins them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from ulid import ULID


def new_id() -> str:
    """A sortable text id (ULID): rows made later sort after rows made earlier."""
    return str(ULID())


def utc_now() -> str:
    """The ``*_utc`` columns: ISO 8601 with microseconds and the +00:00 offset, so text order is time order."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def canonical_json(value: Any) -> str:
    """The ``*_json`` columns and ``answers.prompt_json``: one text for one value (sorted
    keys, no spaces, text kept as written), so equal values are equal strings and hash alike."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def hash_prompt(messages: list[dict]) -> str:
    """``answers.prompt_hash``: sha256 of the prompt's canonical JSON. The one hash of a
    prompt (or of a prompt's history): the store records it, ``tuning.grouping`` keys
    prompts and their contexts by it."""
    return hashlib.sha256(canonical_json(messages).encode()).hexdigest()


def encode_json(row: dict) -> dict:
    """A copy of ``row`` with each ``*_json`` value that is not already text in canonical JSON.

    sqlite-utils would encode a dict or list by itself, but with ``json.dumps`` defaults
    (keys unsorted, spaces), so the same settings would be stored as different text.
    """
    return {key: canonical_json(value) if key.endswith("_json") and not isinstance(value, str | None) else value
            for key, value in row.items()}


def decode_json(row: dict) -> dict:
    """``row`` with its ``*_json`` columns decoded in place (keys keep their names).

    sqlite-utils returns JSON columns as text and has no decoding of its own (only its
    command line's ``--json-cols``), so this stays.
    """
    for key, value in row.items():
        if key.endswith("_json") and isinstance(value, str):
            row[key] = json.loads(value)
    return row
