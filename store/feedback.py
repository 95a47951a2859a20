"""Reading feedback for training: the rows preference data is built from, as plain dicts.

Mixed into ``store.Store``; ``tuning.pairs`` calls :meth:`FeedbackMixin.training_feedback`
and never sees SQL. Two rules are enforced here, at the source, so no caller can forget
them: conversations marked "not for training" contribute nothing (they are only counted),
withdrawn answers (an undone retry or edit) are not feedback (also only counted), and
nothing a disabled account wrote or voted trains (an admin disables an abusive user; their
past feedback stops counting at once, and is counted, not deleted: enabling them again
brings it back).
"""

from __future__ import annotations

import json
from typing import Any

# User turns that carry any feedback: a current (non-cleared) vote on one of their answers,
# or an edit. Only their answers are read: an unrated turn without edits has no signal.
_FEEDBACK_MESSAGES = """
    SELECT a.message_id FROM current_ratings r JOIN answers a ON a.id = r.answer_id
    WHERE r.value != 0
    UNION
    SELECT message_id FROM answers WHERE source = 'edit'
"""

_ANSWERS = f"""
    SELECT a.rowid AS seq, a.id, a.conversation_id, a.message_id, a.user_id, a.source,
           a.edited_from_id, a.prompt_json, a.prompt_hash, a.content, a.finish_reason, a.created_utc,
           a.withdrawn_utc, c.exclude_from_training,
           EXISTS (SELECT 1 FROM users u WHERE u.name = a.user_id AND u.disabled = 1) AS by_disabled
    FROM answers a JOIN conversations c ON c.id = a.conversation_id
    WHERE a.message_id IN ({_FEEDBACK_MESSAGES})
    ORDER BY a.created_utc, a.rowid
"""

_VOTES = """
    SELECT r.answer_id, r.user_id, r.value, r.created_utc,
           EXISTS (SELECT 1 FROM users u WHERE u.name = r.user_id AND u.disabled = 1) AS by_disabled
    FROM current_ratings r WHERE r.value != 0
"""


class FeedbackMixin:
    db: Any  # provided by Store

    def training_feedback(self) -> dict:
        """Every answer with training signal, its current votes, and what was left out.

        Returns ``{"answers": [...], "opted_out": {...}, "withdrawn": {...}, "disabled":
        {...}}``. Each answer
        is a dict: ``id, conversation_id, message_id, user_id, source ('model'|'edit'),
        edited_from_id, prompt (the message list the model saw), prompt_hash, content,
        finish_reason ("length": the token limit cut it), created_utc, shown`` (True for the answer the conversation shows for its turn:
        the newest live one, which the user kept) and ``votes`` (list of ``{user_id,
        value (+1|-1), created_utc}``, each user's current vote; cleared votes are absent).
        Answers are ordered oldest first and include every live sibling of a rated turn.
        ``opted_out``, ``withdrawn`` and ``disabled`` count the conversations, answers and
        votes left out for those three reasons.
        """
        votes: dict[str, list[dict]] = {}
        disabled = {"answers": 0, "votes": 0}
        for answer_id, user_id, value, created, by_disabled in self.db.execute(_VOTES).fetchall():
            if by_disabled:
                disabled["votes"] += 1
                continue
            votes.setdefault(answer_id, []).append(
                {"user_id": user_id, "value": value, "created_utc": created}
            )
        answers: list[dict] = []
        newest: dict[str, dict] = {}
        opted_out = {"conversations": set(), "answers": 0, "votes": 0}
        withdrawn = {"answers": 0, "votes": 0}
        for row in self.db.query(_ANSWERS):
            row_votes = votes.get(row["id"], [])
            if row.pop("exclude_from_training"):
                opted_out["conversations"].add(row["conversation_id"])
                opted_out["answers"] += 1
                opted_out["votes"] += len(row_votes)
                continue
            if row.pop("withdrawn_utc"):
                withdrawn["answers"] += 1
                withdrawn["votes"] += len(row_votes)
                continue
            if row.pop("by_disabled"):  # its votes are the owner's own, already counted above
                disabled["answers"] += 1
                continue
            row["prompt"] = json.loads(row.pop("prompt_json") or "[]")
            row["votes"] = row_votes
            row["shown"] = False
            answers.append(row)
            newest[row["message_id"]] = row  # rows come oldest first: the last one wins
        for row in newest.values():
            row["shown"] = True
        opted_out["conversations"] = len(opted_out["conversations"])
        return {"answers": answers, "opted_out": opted_out, "withdrawn": withdrawn, "disabled": disabled}
