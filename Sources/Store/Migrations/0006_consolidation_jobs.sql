-- 0006: automatic consolidation ("sleep") as a job in the learning queue.
-- users.unconsolidated_tokens: learnable tokens the user's jobs applied
-- since their memory was last consolidated (or reset); users.last_learned_at:
-- when a learning round last applied one of their jobs. Together they say
-- who is due: idle long enough with something to consolidate, or past the
-- configured token count.
ALTER TABLE users ADD COLUMN unconsolidated_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN last_learned_at TIMESTAMPTZ;

-- learning_jobs.kind is one of generation, feedback, consolidate; a
-- consolidate job has no tokens of its own (it consolidates the user's recent
-- contexts kept in the learner part) and names what triggered it.
ALTER TABLE learning_jobs ADD CONSTRAINT learning_jobs_kind CHECK (kind IN ('generation', 'feedback', 'consolidate'));
ALTER TABLE learning_jobs ADD COLUMN trigger TEXT
    CHECK (trigger IS NULL OR trigger IN ('idle', 'fast_norm', 'tokens'));

-- At most one consolidation waits per user, whichever replica or trigger
-- enqueues it (a second INSERT ... ON CONFLICT DO NOTHING adds nothing).
CREATE UNIQUE INDEX learning_jobs_one_consolidation ON learning_jobs (user_id)
    WHERE kind = 'consolidate' AND state = 'queued';
CREATE INDEX users_unconsolidated ON users (last_learned_at) WHERE unconsolidated_tokens > 0;
