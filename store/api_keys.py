"""API keys: the keys half of the store, mixed into ``store.Store``.

A key is 256 random bits; only its sha256 is stored. A slow hash (as for passwords) buys
nothing against a key nobody chose, and one sha256 keeps every API request cheap.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from .errors import NotFound
from .rows import new_id, utc_now

# Recognisable in logs and secret scanners; the rest is secrets.token_urlsafe(32).
KEY_PREFIX = "ak-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeysMixin:
    db: Any

    def issue_api_key(self, user_id: str, label: str = "", created_by: str = "") -> tuple[str, str]:
        """A new key for ``user_id``: returns (its id, the key). The key is not kept."""
        self._user(user_id)  # UserError when there is no such account
        key, key_id = KEY_PREFIX + secrets.token_urlsafe(32), new_id()
        self.db["api_keys"].insert({
            "id": key_id, "user_id": user_id, "key_hash": key_hash(key), "label": label or "",
            "created_by": created_by or "", "created_utc": utc_now(), "revoked_utc": None,
        })
        return key_id, key

    def revoke_api_key(self, key_id: str) -> None:
        if not self.db["api_keys"].count_where("id = ?", [key_id]):
            raise NotFound(f"No API key {key_id!r}.")
        with self._write() as db:  # revoking twice keeps the first time
            db.execute("UPDATE api_keys SET revoked_utc = ? WHERE id = ? AND revoked_utc IS NULL", [utc_now(), key_id])

    def api_keys(self, user_id: str | None = None) -> list[dict]:
        """Every key (of one account), newest first, without hashes."""
        where, params = ("user_id = ?", [user_id]) if user_id else (None, [])
        return [{k: v for k, v in r.items() if k != "key_hash"}
                for r in self.db["api_keys"].rows_where(where, params, order_by="created_utc DESC")]

    def user_for_api_key(self, key: str) -> str | None:
        """The account a key belongs to, if the key is live and the account enabled."""
        if not key:
            return None
        row = self.db.execute(
            "SELECT k.user_id FROM api_keys k JOIN users u ON u.name = k.user_id "
            "WHERE k.key_hash = ? AND k.revoked_utc IS NULL AND u.disabled = 0", [key_hash(key)],
        ).fetchone()
        return row[0] if row else None
