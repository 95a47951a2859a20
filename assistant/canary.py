"""Sticky canary assignment: the same user always lands on the same side of a canary."""

from __future__ import annotations

import hashlib


def in_canary(user_id: str, canary_key: str, share: float) -> bool:
    """True for about ``share`` of users, decided by a hash of (canary, user): stable across
    requests and restarts, independent between canaries, and no state to store."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{canary_key}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share
