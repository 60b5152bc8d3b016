-- 0005: browser sessions for the HTML reports. Signing in with an admin key
-- makes a session: a random token kept by the browser in an HttpOnly cookie
-- and here only as its SHA-256. A session dies with its key (revoked or
-- deleted) and at expires_at; the retention pruner deletes expired ones.
CREATE TABLE sessions (
    token_hash  TEXT PRIMARY KEY,
    key_id      BIGINT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires_at);
