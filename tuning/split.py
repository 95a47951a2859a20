"""Train/eval split that does not leak: by conversation, by prompt group, and by time.

Records (pairs and unpaired examples together) that share a conversation or a prompt
group are linked; linked records form a component and a component goes wholly to one
side, so no conversation and no prompt group (paraphrases included) is on both sides.
Components are taken for evaluation newest first (by their newest record) until the eval
share is reached; one too big to fit is left in train and the next older one is tried, so
a single huge component cannot swallow the whole evaluation set or leave train empty.
"""

from __future__ import annotations

import math
from dataclasses import replace


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _links(record) -> list[str]:
    keys = ["c:" + record.conversation_id, "g:" + record.group_id]
    other = getattr(record, "rejected_conversation_id", None)
    if other:
        keys.append("c:" + other)
    return keys


def assign_splits(pairs: list, unpaired: list, eval_fraction: float) -> tuple[list, list, dict]:
    """Return pairs and unpaired with ``split`` set, and a note on how the split went."""
    records = list(pairs) + list(unpaired)
    uf = _UnionFind()
    for r in records:
        first, *rest = _links(r)
        for k in rest:
            uf.union(first, k)
    components: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        components.setdefault(uf.find(_links(r)[0]), []).append(i)

    target = math.ceil(eval_fraction * len(records))
    newest_first = sorted(
        components.values(),
        key=lambda idx: (max(records[i].created_utc for i in idx), min(records[i].id for i in idx)),
        reverse=True,
    )
    in_eval: set[int] = set()
    skipped = 0
    for idx in newest_first:
        if len(in_eval) >= target:
            break
        if len(in_eval) + len(idx) > target:
            skipped += 1
            continue
        in_eval.update(idx)
    marked = [replace(r, split="eval" if i in in_eval else "train") for i, r in enumerate(records)]
    note = {
        "components": len(components),
        "largest_component": max((len(c) for c in components.values()), default=0),
        "eval_target": target,
        "eval_records": len(in_eval),
        "too_big_for_eval": skipped,
    }
    return marked[: len(pairs)], marked[len(pairs):], note
