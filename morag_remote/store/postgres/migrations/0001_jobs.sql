-- The job table: the columns every query filters or orders on, and the whole RemoteJob as JSONB
-- (``doc``, what ``RemoteJob.to_dict`` returns) so that a new field of the record needs no migration.
-- Ids are compared bytewise (COLLATE "C"): they are time-ordered strings, and list cursors rely on
-- the same order as Python's string comparison.
CREATE TABLE remote_jobs (
    id                text COLLATE "C" PRIMARY KEY,
    status            text NOT NULL CHECK (status IN
                          ('pending', 'processing', 'completed', 'failed', 'timeout', 'cancelled')),
    content_type      text NOT NULL,
    priority          integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    available_at      timestamptz NOT NULL,
    timeout_at        timestamptz,
    completed_at      timestamptz,
    finished_at       timestamptz,   -- terminal jobs only: completed_at, else updated_at (cleanup-old)
    seen_at           timestamptz,   -- heartbeat_at, else started_at (active workers in stats)
    worker_id         text,
    ingestion_task_id text NOT NULL,
    version           integer NOT NULL,
    doc               jsonb NOT NULL
);

-- Claims: per content type, in claim order (higher priority first, then oldest), pending jobs only.
-- available_at is a key column so that jobs waiting out a retry backoff are skipped inside the
-- index, without visiting the table.
CREATE INDEX remote_jobs_claim ON remote_jobs (content_type, priority DESC, created_at, id, available_at)
    WHERE status = 'pending';
-- The earliest delayed job of some types (how long a long poll may sleep).
CREATE INDEX remote_jobs_delayed ON remote_jobs (content_type, available_at) WHERE status = 'pending';
-- The optional pending TTL and the age of the oldest pending job.
CREATE INDEX remote_jobs_pending_age ON remote_jobs (created_at) WHERE status = 'pending';
-- Lapsed leases.
CREATE INDEX remote_jobs_leases ON remote_jobs (timeout_at) WHERE status = 'processing';
-- cleanup-old.
CREATE INDEX remote_jobs_finished ON remote_jobs (finished_at) WHERE finished_at IS NOT NULL;
-- Lists: by status, by ingestion task, by worker, each in creation (id) order; counts for stats.
CREATE INDEX remote_jobs_status ON remote_jobs (status, id);
CREATE INDEX remote_jobs_counts ON remote_jobs (status, content_type);
CREATE INDEX remote_jobs_ingestion ON remote_jobs (ingestion_task_id, id);
CREATE INDEX remote_jobs_worker ON remote_jobs (worker_id, seen_at) WHERE worker_id IS NOT NULL;
