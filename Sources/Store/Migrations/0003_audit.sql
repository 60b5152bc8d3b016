-- 0003: the drift audit. audit_events: every mutation of a user's memory,
-- who/when/why, from which version to which (no text, no weights; an erased
-- user's events go with the user and one content-free tombstone stays).
-- drift_reports: the drift metrics of a user's memory version. Per-tenant
-- audit settings: policies (thresholds and actions) and the probe set.

ALTER TABLE users ADD COLUMN frozen BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE audit_events (
    id              BIGSERIAL PRIMARY KEY,
    tenant_id       BIGINT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id         BIGINT REFERENCES users (id) ON DELETE CASCADE,
    event           TEXT NOT NULL,
    from_version    BIGINT,
    to_version      BIGINT,
    actor           TEXT NOT NULL,
    cause_id        TEXT,
    detail          JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX audit_events_user ON audit_events (user_id, id);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, created_at);

CREATE TABLE drift_reports (
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    version         BIGINT NOT NULL,
    metrics         JSONB NOT NULL,
    flags           JSONB NOT NULL DEFAULT '[]',
    passed          BOOLEAN NOT NULL,
    computed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);
CREATE INDEX drift_reports_computed ON drift_reports (computed_at);

CREATE TABLE audit_settings (
    tenant_id       BIGINT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    policies        JSONB,
    probes          JSONB
);
