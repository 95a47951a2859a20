"""The one owner of the database: conversations, answers, feedback.

``Store(path)`` opens (or creates) the SQLite file, switches it to WAL with a busy timeout
and applies pending migrations. ``Store("postgresql://user[:password]@host[:port]/db")``
does the same on a PostgreSQL server (``store.postgres``), which several app processes
can share; the methods and their guarantees are the same. Every method is safe to call
from any thread (Gradio runs handlers in a thread pool): each thread gets its own connection.

Every read or write that concerns a conversation takes the acting ``user_id`` and refuses
rows of other users exactly as it refuses rows that do not exist, so one user cannot learn
whether another's ids exist.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from .api_keys import ApiKeysMixin
from .errors import InvalidFeedback, NotFound
from .feedback import FeedbackMixin
from .migrations import MIGRATIONS
from . import postgres
from .registry import RegistryMixin
from .rows import canonical_json, hash_prompt, new_id, utc_now
from .stats import StatsMixin
from .users import UsersMixin

# Seconds a writer waits for another writer's lock before giving up with an error. Long
# enough to ride out a training job's burst of writes, short enough that a user sees an
# error instead of a hung page.
BUSY_TIMEOUT_S = 15.0


def owner_only(path: Path) -> None:
    """Create the database file readable and writable by its owner only (0600), or tighten
    one made before: it holds every conversation and the password hashes. SQLite gives the
    -wal and -shm files the database file's mode; ones already there are tightened too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and p.stat().st_mode & 0o077 and p.stat().st_uid == os.getuid():
            os.chmod(p, 0o600)


@dataclass(frozen=True)
class Turn:
    """One user message and the answer currently shown for it (None while generating)."""

    message: dict
    answer: dict | None


class Store(RegistryMixin, FeedbackMixin, StatsMixin, UsersMixin, ApiKeysMixin):
    def __init__(self, target: str | Path):
        """``target``: a SQLite file path, or a postgresql:// URL (``DatabaseUnavailable``,
        with the password left out, when it is malformed or its server cannot be reached)."""
        self._local = threading.local()
        if postgres.is_url(target):
            self.url, self.path = postgres.check_url(str(target)), None
            postgres.apply_migrations(self.db, MIGRATIONS)
            return
        self.url, self.path = None, Path(target)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner_only(self.path)
        db = self.db
        db.execute("PRAGMA journal_mode=WAL")
        MIGRATIONS.apply(db)

    @property
    def location(self) -> str:
        """Where the rows live, fit to print: the file, or the URL without its password."""
        return postgres.redact(self.url) if self.url else str(self.path)

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite3 connections must not cross threads): a
        sqlite-utils ``Database``, or on PostgreSQL a ``store.postgres.PgDatabase`` that
        answers the same calls."""
        db = getattr(self._local, "db", None)
        if self.url and (db is None or not db.usable):
            db = self._local.db = postgres.connect(self.url)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """A transaction of several writes that takes the write lock first (BEGIN IMMEDIATE).

        sqlite-utils' ``atomic()`` begins a deferred transaction, and its ``insert`` reads
        the table's schema before writing, so the transaction starts as a reader and must
        then become the writer. In WAL mode SQLite refuses that upgrade at once with
        "database is locked" while another connection writes: the busy timeout does not
        apply (waiting could deadlock). The load test (bench/load_test.py) lost chats to
        it with 4 users. Taking the lock up front waits its turn like any single write.
        On PostgreSQL the same lock is an advisory lock of the transaction
        (``PgDatabase.write``), held across every process using the database.
        """
        db = self.db
        if self.url:
            with db.write():
                yield db
            return
        if db.conn.in_transaction:  # nested: a savepoint in the outer transaction
            with db.atomic():
                yield db
            return
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        try:
            db.conn.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise

    def schema(self) -> str:
        """The schema as SQL, migrations table excluded: what docs/schema.sql documents.
        SQLite's text; the PostgreSQL tables are made by the same migrations (tested)."""
        if self.url:
            raise NotImplementedError("docs/schema.sql documents the SQLite schema; on PostgreSQL read the tables.")
        rows = self.db.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
            "AND name NOT LIKE '_sqlite_migrations%' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY type DESC, name"
        ).fetchall()
        return ";\n\n".join(r[0].strip() for r in rows) + ";\n"

    # -- conversations -------------------------------------------------------------

    def create_conversation(
        self, user_id: str, system_prompt: str = "", title: str = "", exclude_from_training: bool = False
    ) -> str:
        now = utc_now()
        cid = new_id()
        self.db["conversations"].insert(
            {
                "id": cid,
                "user_id": user_id,
                "title": title,
                "system_prompt": system_prompt,
                "exclude_from_training": int(exclude_from_training),
                "created_utc": now,
                "updated_utc": now,
            }
        )
        return cid

    def conversation(self, conversation_id: str, user_id: str) -> dict:
        rows = list(
            self.db["conversations"].rows_where(
                "id = ? AND user_id = ?", [conversation_id, user_id]
            )
        )
        if not rows:
            raise NotFound(f"No conversation {conversation_id!r} for this user.")
        return rows[0]

    def conversations(self, user_id: str) -> list[dict]:
        return list(
            self.db["conversations"].rows_where(
                "user_id = ?", [user_id], order_by="updated_utc DESC"
            )
        )

    def update_conversation(
        self,
        conversation_id: str,
        user_id: str,
        *,
        system_prompt: str | None = None,
        title: str | None = None,
        exclude_from_training: bool | None = None,
    ) -> None:
        self.conversation(conversation_id, user_id)
        changes: dict[str, Any] = {"updated_utc": utc_now()}
        if system_prompt is not None:
            changes["system_prompt"] = system_prompt
        if title is not None:
            changes["title"] = title
        if exclude_from_training is not None:
            changes["exclude_from_training"] = int(exclude_from_training)
        self.db["conversations"].update(conversation_id, changes)

    # -- turns ---------------------------------------------------------------------

    def add_message(self, conversation_id: str, user_id: str, content: str) -> str:
        """Record a user turn; it follows the answer currently shown for the last turn."""
        conv = self.conversation(conversation_id, user_id)
        turns = self.turns(conversation_id, user_id)
        parent = turns[-1].answer["id"] if turns and turns[-1].answer else None
        mid = new_id()
        now = utc_now()
        with self._write() as db:
            db["messages"].insert(
                {
                    "id": mid,
                    "conversation_id": conv["id"],
                    "user_id": user_id,
                    "parent_answer_id": parent,
                    "content": content,
                    "created_utc": now,
                }
            )
            changes = {"updated_utc": now}
            if not conv["title"]:
                changes["title"] = content[:60]
            db["conversations"].update(conv["id"], changes)
        return mid

    def message(self, message_id: str, user_id: str) -> dict:
        rows = list(
            self.db["messages"].rows_where("id = ? AND user_id = ?", [message_id, user_id])
        )
        if not rows:
            raise NotFound(f"No message {message_id!r} for this user.")
        return rows[0]

    def log_answer(
        self,
        *,
        message_id: str,
        user_id: str,
        prompt: list[dict],
        content: str,
        model: str,
        adapter_name: str | None = None,
        adapter_version: int | None = None,
        sampling: dict | None = None,
        latency_ms: float | None = None,
        first_token_ms: float | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
        trimmed_messages: int = 0,
    ) -> str:
        msg = self.message(message_id, user_id)
        aid = new_id()
        prompt_json = canonical_json(prompt)
        self.db["answers"].insert(
            {
                "id": aid,
                "conversation_id": msg["conversation_id"],
                "message_id": message_id,
                "user_id": user_id,
                "source": "model",
                "edited_from_id": None,
                "prompt_json": prompt_json,
                "prompt_hash": hash_prompt(prompt),
                "content": content,
                "model": model,
                "adapter_name": adapter_name,
                "adapter_version": adapter_version,
                "sampling_json": canonical_json(sampling or {}),
                "latency_ms": latency_ms,
                "first_token_ms": first_token_ms,
                "completion_tokens": completion_tokens,
                "finish_reason": finish_reason,
                "trimmed_messages": trimmed_messages,
                "created_utc": utc_now(),
                "withdrawn_utc": None,
            }
        )
        return aid

    def answer(self, answer_id: str, user_id: str) -> dict:
        rows = list(self.db["answers"].rows_where("id = ? AND user_id = ?", [answer_id, user_id]))
        if not rows:
            raise NotFound(f"No answer {answer_id!r} for this user.")
        return rows[0]

    def answers_to(self, message_id: str, user_id: str) -> list[dict]:
        """All answers to one user turn, oldest first, withdrawn ones included."""
        return list(
            self.db["answers"].rows_where(
                "message_id = ? AND user_id = ?", [message_id, user_id], order_by="created_utc, rowid"
            )
        )

    def turns(self, conversation_id: str, user_id: str) -> list[Turn]:
        """The conversation as shown: each user turn with its newest live answer."""
        self.conversation(conversation_id, user_id)
        messages = list(
            self.db["messages"].rows_where(
                "conversation_id = ?", [conversation_id], order_by="created_utc, rowid"
            )
        )
        current: dict[str, dict] = {}
        for a in self.db["answers"].rows_where(
            "conversation_id = ? AND withdrawn_utc IS NULL",
            [conversation_id],
            order_by="created_utc, rowid",
        ):
            current[a["message_id"]] = a  # newest wins
        return [Turn(m, current.get(m["id"])) for m in messages]

    # -- feedback ------------------------------------------------------------------

    def rate(self, answer_id: str, user_id: str, value: int, comment: str | None = None) -> str:
        """Record a vote (+1, -1, or 0 to clear); a newer vote replaces the user's older one."""
        if value not in (-1, 0, 1):
            raise InvalidFeedback(f"A rating is +1, -1 or 0, not {value!r}.")
        self.answer(answer_id, user_id)
        rid = new_id()
        self.db["ratings"].insert(
            {
                "id": rid,
                "answer_id": answer_id,
                "user_id": user_id,
                "value": value,
                "comment": comment or None,
                "created_utc": utc_now(),
            }
        )
        return rid

    def comment(self, answer_id: str, user_id: str, comment: str) -> str:
        """Attach a comment to the user's current vote (a new row with the same value)."""
        value = self.current_rating(answer_id, user_id) or 0
        return self.rate(answer_id, user_id, value, comment)

    def current_rating(self, answer_id: str, user_id: str) -> int | None:
        row = self.db.execute(
            "SELECT value FROM current_ratings WHERE answer_id = ? AND user_id = ?",
            [answer_id, user_id],
        ).fetchone()
        return None if row is None else row[0]

    def edit_answer(self, answer_id: str, user_id: str, content: str) -> str:
        """Keep the original and record the user's rewrite as a new answer that replaces it."""
        if not content.strip():
            raise InvalidFeedback("An edited answer cannot be empty.")
        original = self.answer(answer_id, user_id)
        if content == original["content"]:
            raise InvalidFeedback("The edit is the same as the answer.")
        aid = new_id()
        row = dict(original)
        row.update(
            {
                "id": aid,
                "source": "edit",
                "edited_from_id": answer_id,
                "content": content,
                "latency_ms": None,
                "first_token_ms": None,
                "completion_tokens": None,
                "finish_reason": None,
                "created_utc": utc_now(),
                "withdrawn_utc": None,
            }
        )
        self.db["answers"].insert(row)
        return aid

    def withdraw_answer(self, answer_id: str, user_id: str) -> None:
        """Undo a retry or an edit: the answer stays on file but is no longer shown."""
        self.answer(answer_id, user_id)
        self.db["answers"].update(answer_id, {"withdrawn_utc": utc_now()})

    # -- reading for tuning and admin ----------------------------------------------

    def rows(self, table: str, where: str | None = None, params: list | None = None) -> Iterator[dict]:
        return self.db[table].rows_where(where, params or [], order_by="rowid")

    def count(self, table: str) -> int:
        return self.db[table].count
