-- 0007: the optimizer's state is kept for the current version only.
-- level_moments: per user and level, that level's optimizer moments (a
-- "continuum-moments" part), rewritten when the level takes a step, deleted
-- when the level or the optimizer starts afresh (reset, rollback). Level
-- snapshots written from now on hold the weights only, and a version's
-- learner part no accumulators, so a learning job stores about a fifth of
-- what it did; snapshots and learner parts written before still decode (with
-- the moments and accumulators they hold).
CREATE TABLE level_moments (
    user_id     BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    level       TEXT NOT NULL,
    tensors     BYTEA NOT NULL,
    PRIMARY KEY (user_id, level)
);
-- float32 data that pglz barely compresses (as 0002 for the other parts).
ALTER TABLE level_moments ALTER COLUMN tensors SET STORAGE EXTERNAL;
