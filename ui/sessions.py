"""Sessions that end: Gradio's token -> user name map, checked on every request.

Gradio keeps sign-ins in ``App.tokens`` (cookie token -> user name) and reads it with
``tokens.get(token)`` for every request that needs a user: page config, queue joins, the
event stream, files, the API. :class:`Sessions` is that map with a check in ``get``: the
session ends (the request gets 401, the page asks to sign in) once it is older than
``max_age_s`` (7 days), or the account is disabled, or its password changed after the
session began. Each check is one primary-key read of SQLite.
"""

from __future__ import annotations

import time
from typing import Callable

from store.rows import utc_now

# A week: people sign in once a working week; a stolen cookie works for at most that long.
SESSION_MAX_AGE_S = 7 * 86400


class Sessions(dict):
    def __init__(self, store, max_age_s: float = SESSION_MAX_AGE_S, clock: Callable[[], float] = time.time):
        super().__init__()
        self.store, self.max_age_s, self.clock = store, max_age_s, clock
        self.began: dict[str, tuple[float, str]] = {}  # token -> (clock time, UTC time)

    def __setitem__(self, token: str, name: str) -> None:  # Gradio's /login, after the check
        now = self.clock()
        for old in [t for t, (began, _) in self.began.items() if now - began > self.max_age_s]:
            self.pop_session(old)  # expired and never read again: do not keep them forever
        super().__setitem__(token, name)
        self.began[token] = (now, utc_now())

    def __delitem__(self, token: str) -> None:  # Gradio's /logout
        super().__delitem__(token)
        self.began.pop(token, None)

    def pop_session(self, token: str) -> None:
        if token in self:
            del self[token]

    def get(self, token, default=None):
        name = super().get(token)
        if name is None:
            return default
        began, since_utc = self.began[token]
        if self.clock() - began > self.max_age_s or not self.store.session_valid(name, since_utc):
            self.pop_session(token)
            return default
        return name
