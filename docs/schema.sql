CREATE VIEW "current_ratings" AS 
        SELECT r.* FROM ratings r
        WHERE r.id = (
            SELECT r2.id FROM ratings r2
            WHERE r2.answer_id = r.answer_id AND r2.user_id = r.user_id
            ORDER BY r2.created_utc DESC, r2.rowid DESC LIMIT 1
        );

CREATE TABLE "adapters" (
   "version" INTEGER PRIMARY KEY,
   "name" TEXT NOT NULL,
   "content_hash" TEXT NOT NULL,
   "parent_version" INTEGER,
   "base_model" TEXT NOT NULL,
   "path" TEXT NOT NULL,
   "job_id" TEXT,
   "pair_ids_json" TEXT,
   "config_json" TEXT,
   "metrics_json" TEXT,
   "eval_json" TEXT,
   "gate_passed" INTEGER,
   "trainable_params" INTEGER,
   "trainable_share" REAL,
   "train_seconds" REAL,
   "cost_json" TEXT,
   "created_utc" TEXT NOT NULL
);

CREATE TABLE "answers" (
   "id" TEXT PRIMARY KEY,
   "conversation_id" TEXT NOT NULL REFERENCES "conversations"("id"),
   "message_id" TEXT NOT NULL REFERENCES "messages"("id"),
   "user_id" TEXT NOT NULL,
   "source" TEXT NOT NULL,
   "edited_from_id" TEXT REFERENCES "answers"("id"),
   "prompt_json" TEXT,
   "prompt_hash" TEXT,
   "content" TEXT NOT NULL,
   "model" TEXT,
   "adapter_name" TEXT,
   "adapter_version" INTEGER,
   "sampling_json" TEXT,
   "latency_ms" REAL,
   "first_token_ms" REAL,
   "completion_tokens" INTEGER,
   "finish_reason" TEXT,
   "trimmed_messages" INTEGER,
   "created_utc" TEXT NOT NULL,
   "withdrawn_utc" TEXT
);

CREATE TABLE "api_keys" (
   "id" TEXT PRIMARY KEY,
   "user_id" TEXT NOT NULL REFERENCES "users"("name"),
   "key_hash" TEXT NOT NULL,
   "label" TEXT,
   "created_by" TEXT,
   "created_utc" TEXT NOT NULL,
   "revoked_utc" TEXT
);

CREATE TABLE "conversations" (
   "id" TEXT PRIMARY KEY,
   "user_id" TEXT NOT NULL,
   "title" TEXT DEFAULT '',
   "system_prompt" TEXT DEFAULT '',
   "exclude_from_training" INTEGER DEFAULT 0,
   "created_utc" TEXT NOT NULL,
   "updated_utc" TEXT
);

CREATE TABLE "messages" (
   "id" TEXT PRIMARY KEY,
   "conversation_id" TEXT NOT NULL REFERENCES "conversations"("id"),
   "user_id" TEXT NOT NULL,
   "parent_answer_id" TEXT,
   "content" TEXT NOT NULL,
   "created_utc" TEXT NOT NULL
);

CREATE TABLE "promotions" (
   "id" TEXT PRIMARY KEY,
   "kind" TEXT NOT NULL,
   "version" INTEGER,
   "share" REAL,
   "actor" TEXT NOT NULL,
   "reason" TEXT,
   "gate_override" INTEGER,
   "created_utc" TEXT NOT NULL
);

CREATE TABLE "ratings" (
   "id" TEXT PRIMARY KEY,
   "answer_id" TEXT NOT NULL REFERENCES "answers"("id"),
   "user_id" TEXT NOT NULL,
   "value" INTEGER NOT NULL,
   "comment" TEXT,
   "created_utc" TEXT NOT NULL
);

CREATE TABLE "training_jobs" (
   "id" TEXT PRIMARY KEY,
   "status" TEXT NOT NULL,
   "created_by" TEXT,
   "config_json" TEXT,
   "progress_json" TEXT,
   "error" TEXT,
   "adapter_version" INTEGER,
   "created_utc" TEXT NOT NULL,
   "started_utc" TEXT,
   "finished_utc" TEXT
, "cancel_requested" INTEGER NOT NULL DEFAULT 0, "pid" INTEGER, "heartbeat_utc" TEXT, "host" TEXT);

CREATE TABLE "users" (
   "name" TEXT PRIMARY KEY,
   "password_hash" TEXT NOT NULL,
   "is_admin" INTEGER DEFAULT 0,
   "disabled" INTEGER DEFAULT 0,
   "created_utc" TEXT NOT NULL
, "password_changed_utc" TEXT);

CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");

CREATE UNIQUE INDEX "idx_adapters_name"
    ON "adapters" ("name");

CREATE INDEX "idx_answers_message_id_created_utc"
    ON "answers" ("message_id", "created_utc");

CREATE INDEX "idx_answers_prompt_hash"
    ON "answers" ("prompt_hash");

CREATE UNIQUE INDEX "idx_api_keys_key_hash"
    ON "api_keys" ("key_hash");

CREATE INDEX "idx_conversations_user_id_updated_utc"
    ON "conversations" ("user_id", "updated_utc");

CREATE INDEX "idx_messages_conversation_id_created_utc"
    ON "messages" ("conversation_id", "created_utc");

CREATE INDEX "idx_ratings_answer_id_user_id_created_utc"
    ON "ratings" ("answer_id", "user_id", "created_utc");

CREATE INDEX "idx_training_jobs_status"
    ON "training_jobs" ("status");
