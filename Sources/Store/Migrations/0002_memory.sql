-- 0002: what the service needs to keep each user's memory.
-- users.learner: the user's current learner part (accumulators, counters,
-- recent contexts; NULL: fresh), rewritten by every learning job; the level
-- weights live in level_snapshots, one row per level change, which the
-- memory_versions rows name.

ALTER TABLE users ADD COLUMN learner BYTEA;
ALTER TABLE users ADD COLUMN jobs_applied BIGINT NOT NULL DEFAULT 0;

ALTER TABLE memory_versions ALTER COLUMN learner DROP NOT NULL;

ALTER TABLE learning_jobs ADD COLUMN actor TEXT NOT NULL DEFAULT '';

CREATE TABLE feedback (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    generation_id   UUID NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    rating          TEXT NOT NULL,
    correction      TEXT,
    actor           TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX feedback_user ON feedback (user_id);

-- Level tensors and learner parts are float32 data that pglz barely
-- compresses: store them out of line uncompressed (no CPU spent on it).
ALTER TABLE level_snapshots ALTER COLUMN tensors SET STORAGE EXTERNAL;
ALTER TABLE users ALTER COLUMN learner SET STORAGE EXTERNAL;
ALTER TABLE memory_versions ALTER COLUMN learner SET STORAGE EXTERNAL;
