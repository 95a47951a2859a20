"""Accounts: the users half of the store, mixed into ``store.Store``."""

from __future__ import annotations

import re
from typing import Any

from .actors import LEGACY_NAMES
from .passwords import check_password, dummy_hash, hash_password
from .rows import utc_now

# Names become ids in every table and appear on admin pages: keep them plain. No ':', so
# no account can be one of the app's own actors (store.actors: "system:scheduler"...).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD_CHARS = 8


class UserError(ValueError):
    """A user name or password that cannot be used; the message says why."""


class UsersMixin:
    db: Any

    def create_user(self, name: str, password: str, *, is_admin: bool = False) -> None:
        if not NAME_RE.fullmatch(name or ""):
            raise UserError("A user name is 1-64 letters, digits or . _ @ -, starting with a letter or digit.")
        if name in LEGACY_NAMES:  # the app's own actors in older rows (store.actors)
            raise UserError(f"{name!r} names one of the app's own actions in its logs; choose another name.")
        if len(password or "") < MIN_PASSWORD_CHARS:
            raise UserError(f"A password needs at least {MIN_PASSWORD_CHARS} characters.")
        if self.db["users"].count_where("name = ?", [name]):
            raise UserError(f"User {name!r} already exists.")
        self.db["users"].insert(
            {
                "name": name,
                "password_hash": hash_password(password),
                "is_admin": int(is_admin),
                "disabled": 0,
                "created_utc": utc_now(),
            }
        )

    def set_password(self, name: str, password: str) -> None:
        if len(password or "") < MIN_PASSWORD_CHARS:
            raise UserError(f"A password needs at least {MIN_PASSWORD_CHARS} characters.")
        self._user(name)
        self.db["users"].update(name, {"password_hash": hash_password(password), "password_changed_utc": utc_now()})

    def set_disabled(self, name: str, disabled: bool) -> None:
        """A disabled account cannot sign in; its sessions and API keys stop working at once."""
        self._user(name)
        self.db["users"].update(name, {"disabled": int(disabled)})

    def session_valid(self, name: str, since_utc: str) -> bool:
        """May a session that signed in as ``name`` at ``since_utc`` go on? Only while the
        account exists, is enabled, and its password has not changed since."""
        row = self.db.execute(
            "SELECT 1 FROM users WHERE name = ? AND disabled = 0 "
            "AND (password_changed_utc IS NULL OR password_changed_utc <= ?)", [name, since_utc],
        ).fetchone()
        return row is not None

    def set_admin(self, name: str, is_admin: bool) -> None:
        self._user(name)
        self.db["users"].update(name, {"is_admin": int(is_admin)})

    def _user(self, name: str) -> dict:
        rows = list(self.db["users"].rows_where("name = ?", [name]))
        if not rows:
            raise UserError(f"No user {name!r}.")
        return rows[0]

    def verify_password(self, name: str, password: str) -> bool:
        rows = list(self.db["users"].rows_where("name = ? AND disabled = 0", [name]))
        if not rows:
            check_password(password, dummy_hash())  # one scrypt, as for a real name
            return False
        return check_password(password, rows[0]["password_hash"])

    def is_admin(self, name: str | None) -> bool:
        if not name:
            return False
        return bool(self.db["users"].count_where("name = ? AND is_admin = 1 AND disabled = 0", [name]))

    def users(self) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "password_hash"}
            for r in self.db["users"].rows_where(order_by="name")
        ]

    def has_users(self) -> bool:
        return self.db["users"].count > 0
