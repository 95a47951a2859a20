"""The store's own errors about rows, raised by ``Store`` and by its mixins alike."""


class NotFound(LookupError):
    """No such row for this user (it does not exist, or belongs to someone else)."""


class InvalidFeedback(ValueError):
    """Feedback that cannot be recorded (bad value, empty edit, ...)."""
