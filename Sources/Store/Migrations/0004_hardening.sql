-- 0004: roles for API keys, cancelled learning jobs, and the indexes the
-- retention pruner deletes by.
-- api_keys.role: 'app' keys serve an application's requests, 'admin' keys
-- also operate memories and the audit. Keys made before roles existed could
-- do everything, so they become admin keys; new keys are app keys unless
-- made otherwise.
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'admin' CHECK (role IN ('app', 'admin'));
ALTER TABLE api_keys ALTER COLUMN role SET DEFAULT 'app';

-- learning_jobs.state is one of queued, done, failed, cancelled (a reset,
-- rollback or import cancels the user's jobs queued before it).
ALTER TABLE learning_jobs ADD CONSTRAINT learning_jobs_state CHECK (state IN ('queued', 'done', 'failed', 'cancelled'));

CREATE INDEX learning_jobs_finished ON learning_jobs (finished_at) WHERE state <> 'queued';
CREATE INDEX generations_created ON generations (created_at);
CREATE INDEX audit_events_created ON audit_events (created_at);
