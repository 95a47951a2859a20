"""SQLite storage: the only package that touches the database (see store.store)."""

from .store import InvalidFeedback, NotFound, Store, Turn
from .users import UserError

__all__ = ["InvalidFeedback", "NotFound", "Store", "Turn", "UserError"]
