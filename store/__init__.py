"""SQLite storage: the only package that touches the database (see store.store)."""

from .store import InvalidFeedback, NotFound, Store, Turn

__all__ = ["InvalidFeedback", "NotFound", "Store", "Turn"]
