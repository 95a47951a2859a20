"""Sign-in for Gradio's ``/login``: the password check off the event loop, behind a backoff.

Gradio awaits an ``async`` auth function inside its login route and calls a plain one right
there, on the event loop: a 50 ms scrypt per attempt then stalls every page of every user
(the audit measured 3 ms -> 840 ms median). :meth:`SignIn.check` is async: scrypt runs in
a worker thread, at most ``checks_at_once`` at a time, and attempts over the backoff are
answered at once, without scrypt.

The policy (:class:`Policy`; docs/faults.md says what an attacker gets):

- Per account name and per client address (IPv6: per /64), the first ``free_failures``
  failures cost nothing; after that each attempt waits ``base_delay_s * 2**(k - free)``
  after the k-th failure, at most ``max_delay_s``.
- An attempt made while a wait runs is refused with 429 and ``Retry-After``, and does not
  count: hammering does not make the wait longer.
- An attempt counts as a failure from the moment it starts (so a burst of concurrent
  attempts cannot all slip past the count); a success clears that account's and that
  address's failures.
- The account's wait does not apply to an address that signed in to that account before
  (since the server started): failures on alice's name from elsewhere cannot lock alice
  out where she signs in; only her own address's limit applies to her.
- Failures are forgotten ``forget_after_s`` after the last one; at most ``max_tracked``
  names and addresses are tracked (the least recently used are dropped first).
"""

from __future__ import annotations

import contextvars
import ipaddress
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import anyio
from cachetools import TTLCache
from fastapi import HTTPException

# The client address of the request being served, set by ui.server's middleware (Gradio
# hands the auth function only the name and the password).
PEER: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="")


@dataclass(frozen=True)
class Policy:
    # Five free tries: enough for a person who mistypes, too few to guess with.
    free_failures: int = 5
    # 1 s after the 5th failure, doubling: 2 min after the 12th. After that one guess per
    # two minutes per name: 720 a day, against a password of 8+ characters.
    base_delay_s: float = 1.0
    # Short, so a real user whose name is under attack waits at most this long from a new
    # address (never from one they signed in from before).
    max_delay_s: float = 120.0
    # A person who got it wrong yesterday starts afresh.
    forget_after_s: float = 3600.0
    # Bounds the memory an attacker cycling through names or addresses can take.
    max_tracked: int = 100_000
    # scrypt takes a core for ~50 ms: at most half the cores check passwords at once, so a
    # flood leaves the rest to the signed-in users.
    checks_at_once: int = max(1, (os.cpu_count() or 2) // 2)
    # More attempts than this waiting for a check are refused at once (503).
    max_waiting: int = 32


def address_key(address: str) -> str:
    """The address an attacker cannot cheaply change: IPv4 as is, IPv6 by its /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Backoff:
    """Failure counts and waits per account and per address (event-loop thread only)."""

    def __init__(self, policy: Policy = Policy(), clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        # key -> (failures, monotonic time before which attempts are refused)
        self.failures: TTLCache = TTLCache(policy.max_tracked, policy.forget_after_s, timer=clock)
        # (account, address) pairs that signed in: exempt from the account's wait.
        self.trusted: TTLCache = TTLCache(policy.max_tracked, 30 * 86400, timer=clock)

    def _keys(self, account: str, address: str) -> list[tuple[str, str]]:
        address = address_key(address)
        keys = [("address", address)]
        if (account, address) not in self.trusted:
            keys.append(("account", account))
        return keys

    def wait_s(self, account: str, address: str) -> float:
        """Seconds before this attempt may run (0: now)."""
        now = self.clock()
        return max([0.0] + [self.failures[k][1] - now for k in self._keys(account, address) if k in self.failures])

    def failed(self, account: str, address: str) -> None:
        p, now = self.policy, self.clock()
        for key in self._keys(account, address):
            count = self.failures.get(key, (0, 0.0))[0] + 1
            delay = 0.0 if count < p.free_failures else min(p.base_delay_s * 2 ** (count - p.free_failures), p.max_delay_s)
            self.failures[key] = (count, now + delay)

    def succeeded(self, account: str, address: str) -> None:
        address = address_key(address)
        self.failures.pop(("address", address), None)
        self.failures.pop(("account", account), None)
        self.trusted[(account, address)] = True


class SignIn:
    """Pass ``SignIn(store.verify_password).check`` as Gradio's ``auth`` (a bound async
    method: Gradio awaits it only if ``inspect.iscoroutinefunction`` says so)."""

    def __init__(self, verify: Callable[[str, str], bool], policy: Policy = Policy(),
                 clock: Callable[[], float] = time.monotonic):
        self.verify, self.policy = verify, policy
        self.backoff = Backoff(policy, clock)
        self.pending = 0
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop

    async def check(self, username: str, password: str) -> bool:
        address = PEER.get()
        wait = self.backoff.wait_s(username, address)
        if wait > 0:
            raise HTTPException(429, f"Too many failed sign-ins; try again in {math.ceil(wait)} s.",
                                headers={"Retry-After": str(math.ceil(wait))})
        if self.pending >= self.policy.checks_at_once + self.policy.max_waiting:
            raise HTTPException(503, "Too many sign-ins at once; try again in a few seconds.",
                                headers={"Retry-After": "5"})
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.policy.checks_at_once)
        self.backoff.failed(username, address)  # until it succeeds (see the module docstring)
        self.pending += 1
        try:
            ok = await anyio.to_thread.run_sync(self.verify, username, password, limiter=self._limiter)
        finally:
            self.pending -= 1
        if ok:
            self.backoff.succeeded(username, address)
        return bool(ok)
