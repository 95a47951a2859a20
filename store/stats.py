"""Read-only figures for the admin console: feedback per day and per version, canary counts.

The SQL is the part SQLite and PostgreSQL share: counts of CASE (PostgreSQL sums no
booleans), a named subquery, a typed NULL test of a parameter."""

from __future__ import annotations

from typing import Any

# Only answers the model produced count towards a version's thumbs-up rate: an edit is the
# user's text, not the version's.
_VOTES = """
    SELECT a.adapter_version AS version, r.value AS value, r.created_utc AS created_utc,
           r.user_id AS user_id, a.id AS answer_id
    FROM current_ratings r JOIN answers a ON a.id = r.answer_id
    WHERE r.value != 0 AND a.source = 'model'
"""


class StatsMixin:
    db: Any

    def ratings_per_day(self, days: int = 30) -> list[dict]:
        """[{day, up, down}] for the last ``days`` days that had votes, oldest first."""
        return list(self.db.query(
            f"""SELECT substr(created_utc, 1, 10) AS day,
                       COUNT(CASE WHEN value = 1 THEN 1 END) AS up,
                       COUNT(CASE WHEN value = -1 THEN 1 END) AS down
                FROM ({_VOTES}) AS votes GROUP BY day ORDER BY day DESC LIMIT ?""",
            [days],
        ))[::-1]

    def thumbs_up_by_version(self, since_utc: str | None = None) -> list[dict]:
        """[{version, up, down, rate}] per adapter version (None: base), votes since a time."""
        where, params = ("WHERE created_utc >= ?", [since_utc]) if since_utc else ("", [])
        rows = list(self.db.query(
            f"""SELECT version, COUNT(CASE WHEN value = 1 THEN 1 END) AS up,
                       COUNT(CASE WHEN value = -1 THEN 1 END) AS down
                FROM ({_VOTES}) AS votes {where} GROUP BY version ORDER BY version""",
            params,
        ))
        for r in rows:
            total = r["up"] + r["down"]
            r["rate"] = r["up"] / total if total else None
        return rows

    def latest_downvotes(self, limit: int = 20) -> list[dict]:
        return list(self.db.query(
            """SELECT r.created_utc, r.user_id, r.comment, a.adapter_version AS version,
                      m.content AS prompt, a.content AS answer, a.id AS answer_id
               FROM current_ratings r
               JOIN answers a ON a.id = r.answer_id JOIN messages m ON m.id = a.message_id
               WHERE r.value = -1 ORDER BY r.created_utc DESC LIMIT ?""",
            [limit],
        ))

    def feedback_count_since(self, since_utc: str | None) -> int:
        """Feedback training would read, newer than a time: what scheduled retraining counts.

        Each user's current vote per answer (a thumb flipped 50 times is one vote; a cleared
        one is none) and each edit, on answers not withdrawn, in conversations not marked
        "not for training" (the same rules as ``FeedbackMixin.training_feedback``). Raw
        rating rows would let one user start jobs with nothing to train on.
        """
        votes = self.db.execute(
            """SELECT COUNT(*) FROM current_ratings r JOIN answers a ON a.id = r.answer_id
               JOIN conversations c ON c.id = a.conversation_id
               WHERE r.value != 0 AND a.withdrawn_utc IS NULL AND c.exclude_from_training = 0
               AND (CAST(? AS TEXT) IS NULL OR r.created_utc > ?)""",
            [since_utc, since_utc],
        ).fetchone()[0]
        edits = self.db.execute(
            """SELECT COUNT(*) FROM answers a JOIN conversations c ON c.id = a.conversation_id
               WHERE a.source = 'edit' AND a.withdrawn_utc IS NULL AND c.exclude_from_training = 0
               AND (CAST(? AS TEXT) IS NULL OR a.created_utc > ?)""",
            [since_utc, since_utc],
        ).fetchone()[0]
        return votes + edits
