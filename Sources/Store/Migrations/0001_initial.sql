-- 0001: tenants and their API keys, users, memory versions and level
-- snapshots, generations, and the learning-job queue.
-- Every table that holds a user's data references users(id) ON DELETE CASCADE,
-- so erasing a user (DELETE FROM users) removes all of it.

CREATE TABLE tenants (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    learning    BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          BIGSERIAL PRIMARY KEY,
    tenant_id   BIGINT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        TEXT NOT NULL DEFAULT '',
    prefix      TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);

CREATE TABLE users (
    id          BIGSERIAL PRIMARY KEY,
    tenant_id   BIGINT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE level_snapshots (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    level       TEXT NOT NULL,
    dtype       TEXT NOT NULL,
    shapes      JSONB NOT NULL,
    tensors     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX level_snapshots_user ON level_snapshots (user_id);

CREATE TABLE memory_versions (
    user_id     BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    parent      BIGINT,
    levels      JSONB NOT NULL,
    learner     BYTEA NOT NULL,
    cause       TEXT NOT NULL,
    cause_id    TEXT,
    actor       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);

CREATE TABLE generations (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    memory_version  BIGINT NOT NULL,
    prompt_tokens   INT[] NOT NULL,
    completion_tokens INT[] NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX generations_user ON generations (user_id, created_at);

CREATE TABLE learning_jobs (
    id              BIGSERIAL PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    source_id       UUID,
    tokens          INT[] NOT NULL,
    learnable       BOOLEAN[] NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued',
    applied_version BIGINT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);
CREATE INDEX learning_jobs_queued ON learning_jobs (user_id, id) WHERE state = 'queued';
