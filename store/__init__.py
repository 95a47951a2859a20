"""Storage on SQLite or PostgreSQL: the only package that touches the database (see store.store)."""

from .errors import InvalidFeedback, NotFound
from .store import Store, Turn
from .registry import JobConflict
from .users import UserError
from .postgres import DatabaseUnavailable

__all__ = ["DatabaseUnavailable", "InvalidFeedback", "JobConflict", "NotFound", "Store", "Turn", "UserError"]
