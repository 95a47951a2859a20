"""Ordered schema migrations for the assistant's SQLite file.

Each step is a small named function registered on ``MIGRATIONS``; sqlite-utils applies the
pending ones when a :class:`store.Store` opens, each inside a transaction together with
its record in ``_sqlite_migrations``, so a file is never left half-migrated.

Never edit or reorder a step once it has shipped: add a new one.
"""

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("assistant")

# The numbers jump from m002 to m005: no step was ever named m003 or m004 (the history has
# none; the numbers were skipped when users were added). sqlite-utils records each step by
# name and applies them in the order registered here, so the gap changes nothing, and
# renumbering would make every existing file run its shipped steps again.


@MIGRATIONS()
def m001_conversations_and_answers(db: Database) -> None:
    db["conversations"].create(
        {
            "id": str,  # ULID
            "user_id": str,
            "title": str,
            "system_prompt": str,
            # The user's "not for training" switch; rows of such conversations never reach
            # a training set or an export.
            "exclude_from_training": int,
            "created_utc": str,
            "updated_utc": str,
        },
        pk="id",
        not_null={"user_id", "created_utc"},
        defaults={"exclude_from_training": 0, "system_prompt": "", "title": ""},
    )
    db["conversations"].create_index(["user_id", "updated_utc"])

    # One row per user turn. parent_answer_id is the answer the user was looking at when
    # they wrote it, so the conversation state each turn answered can be rebuilt exactly.
    db["messages"].create(
        {
            "id": str,
            "conversation_id": str,
            "user_id": str,
            "parent_answer_id": str,
            "content": str,
            "created_utc": str,
        },
        pk="id",
        not_null={"conversation_id", "user_id", "content", "created_utc"},
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["messages"].create_index(["conversation_id", "created_utc"])

    # Every answer the user was shown: generated (source='model', retries are siblings with
    # the same message_id) or written by the user (source='edit', edited_from_id = the
    # answer it replaced). Withdrawn answers (undo) stay, marked withdrawn_utc.
    db["answers"].create(
        {
            "id": str,
            "conversation_id": str,
            "message_id": str,
            "user_id": str,
            "source": str,
            "edited_from_id": str,
            "prompt_json": str,  # the exact messages sent to the model (after trimming)
            "prompt_hash": str,  # sha256 of prompt_json: the conversation state answered
            "content": str,
            "model": str,  # base model identity
            "adapter_name": str,  # NULL: the base model
            "adapter_version": int,
            "sampling_json": str,
            "latency_ms": float,  # request to last token
            "first_token_ms": float,
            "completion_tokens": int,
            "finish_reason": str,
            "trimmed_messages": int,  # how many old messages were dropped to fit the context
            "created_utc": str,
            "withdrawn_utc": str,
        },
        pk="id",
        not_null={"conversation_id", "message_id", "user_id", "source", "content", "created_utc"},
        foreign_keys=[
            ("conversation_id", "conversations", "id"),
            ("message_id", "messages", "id"),
            ("edited_from_id", "answers", "id"),
        ],
    )
    db["answers"].create_index(["message_id", "created_utc"])
    db["answers"].create_index(["prompt_hash"])

    # Append-only: changing one's mind adds a row; value 0 clears a vote (undo). The
    # current vote of a user on an answer is their newest row.
    db["ratings"].create(
        {
            "id": str,
            "answer_id": str,
            "user_id": str,
            "value": int,  # +1 up, -1 down, 0 cleared
            "comment": str,
            "created_utc": str,
        },
        pk="id",
        not_null={"answer_id", "user_id", "value", "created_utc"},
        foreign_keys=[("answer_id", "answers", "id")],
    )
    db["ratings"].create_index(["answer_id", "user_id", "created_utc"])
    db.create_view(
        "current_ratings",
        """
        SELECT r.* FROM ratings r
        WHERE r.id = (
            SELECT r2.id FROM ratings r2
            WHERE r2.answer_id = r.answer_id AND r2.user_id = r.user_id
            ORDER BY r2.created_utc DESC, r2.rowid DESC LIMIT 1
        )
        """,
    )


@MIGRATIONS()
def m002_adapters_jobs_promotions(db: Database) -> None:
    # One row per LoRA adapter version. The folder under the data dir holds a standard PEFT
    # adapter (adapter_config.json + adapter_model.safetensors); name and content_hash are
    # immutable identities of its content (a new version never reuses a name).
    db["adapters"].create(
        {
            "version": int,
            "name": str,
            "content_hash": str,
            "parent_version": int,
            "base_model": str,  # identity of the base model it was trained on
            "path": str,  # relative to the data dir
            "job_id": str,
            "pair_ids_json": str,
            "config_json": str,
            "metrics_json": str,  # training metrics
            "eval_json": str,  # evaluation gate results
            "gate_passed": int,
            "trainable_params": int,
            "trainable_share": float,
            "train_seconds": float,
            "cost_json": str,  # estimated cost vs full fine-tuning
            "created_utc": str,
        },
        pk="version",
        not_null={"name", "content_hash", "base_model", "path", "created_utc"},
    )
    db["adapters"].create_index(["name"], unique=True)

    db["training_jobs"].create(
        {
            "id": str,
            "status": str,  # queued, running, succeeded, failed, cancelled
            "created_by": str,
            "config_json": str,
            "progress_json": str,  # latest step, loss, reward accuracy, margin
            "error": str,
            "adapter_version": int,
            "created_utc": str,
            "started_utc": str,
            "finished_utc": str,
        },
        pk="id",
        not_null={"status", "created_utc"},
    )
    db["training_jobs"].create_index(["status"])

    # Append-only log of what was live when; the newest row of kind 'live' says what serves.
    # version NULL is the base model. kind 'canary' rows give a candidate a share of users.
    db["promotions"].create(
        {
            "id": str,
            "kind": str,  # live, canary
            "version": int,
            "share": float,  # canary: fraction of users; live: 1.0
            "actor": str,
            "reason": str,
            "gate_override": int,
            "created_utc": str,
        },
        pk="id",
        not_null={"kind", "actor", "created_utc"},
    )


@MIGRATIONS()
def m005_users(db: Database) -> None:
    # Accounts for sign-in. Passwords are stored as scrypt hashes (store/passwords.py);
    # user ids elsewhere (conversations.user_id, ratings.user_id, ...) are the names here.
    db["users"].create(
        {
            "name": str,
            "password_hash": str,
            "is_admin": int,
            "disabled": int,
            "created_utc": str,
        },
        pk="name",
        not_null={"password_hash", "created_utc"},
        defaults={"is_admin": 0, "disabled": 0},
    )


@MIGRATIONS()
def m006_job_control(db: Database) -> None:
    # The console asks a running job to stop by setting cancel_requested; the trainer polls
    # it between steps. pid and heartbeat_utc let a restarted app tell a job whose process
    # died (left 'running') from one still at work.
    db["training_jobs"].add_column("cancel_requested", int, not_null_default=0)
    db["training_jobs"].add_column("pid", int)
    db["training_jobs"].add_column("heartbeat_utc", str)


@MIGRATIONS()
def m007_password_changed(db: Database) -> None:
    # A session begun before this time is over (ui.sessions): a new password signs out
    # everyone holding the old one. NULL: never changed since the account was made.
    db["users"].add_column("password_changed_utc", str)


@MIGRATIONS()
def m008_api_keys(db: Database) -> None:
    # Keys of the OpenAI-compatible API, one account each. Only the sha256 of a key is
    # kept (the key itself is shown once when issued); a revoked key, or any key of a
    # disabled account, is refused.
    db["api_keys"].create(
        {
            "id": str,  # ULID: how admins name a key to revoke it
            "user_id": str,
            "key_hash": str,
            "label": str,
            "created_by": str,
            "created_utc": str,
            "revoked_utc": str,
        },
        pk="id",
        not_null={"user_id", "key_hash", "created_utc"},
        foreign_keys=[("user_id", "users", "name")],
    )
    db["api_keys"].create_index(["key_hash"], unique=True)


@MIGRATIONS()
def m009_job_host(db: Database) -> None:
    # The machine a job was queued on and runs on (socket.gethostname()): with several app
    # replicas on one PostgreSQL database, a job's pid means something only on its own
    # machine, so another replica judges it by its heartbeat alone. NULL: rows from before.
    db["training_jobs"].add_column("host", str)
