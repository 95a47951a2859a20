"""SQLite storage: the only package that touches the database (see store.store)."""

from .errors import InvalidFeedback, NotFound
from .store import Store, Turn
from .registry import JobConflict
from .users import UserError

__all__ = ["InvalidFeedback", "JobConflict", "NotFound", "Store", "Turn", "UserError"]
