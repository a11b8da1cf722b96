-- Routing and policies (issue 18): the status held, requirement sets, expires_at, and the
-- operators' controls per content type.

ALTER TABLE remote_jobs DROP CONSTRAINT remote_jobs_status_check;
ALTER TABLE remote_jobs ADD CONSTRAINT remote_jobs_status_check CHECK (status IN
    ('pending', 'processing', 'completed', 'failed', 'timeout', 'cancelled', 'held'));

-- The job's requirement set as its key (routing.requirement_key; '' for none) and the pending
-- deadline. Jobs that need the same thing share a key; the claim index leads with it, so a claim
-- walks only the sets its poller meets (each tested once, against remote_job_requirements).
ALTER TABLE remote_jobs ADD COLUMN requires_key text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE remote_jobs ADD COLUMN expires_at timestamptz;

DROP INDEX remote_jobs_claim;
CREATE INDEX remote_jobs_claim ON remote_jobs (content_type, requires_key, priority DESC, created_at, id, available_at)
    WHERE status = 'pending';
CREATE INDEX remote_jobs_expiry ON remote_jobs (expires_at) WHERE status = 'pending' AND expires_at IS NOT NULL;

-- Every distinct requirement set a job was created with (few in practice): labels to be a subset
-- of the poller's, minimums (name -> number) each met by a resource of at least that value.
CREATE TABLE remote_job_requirements (
    key      text COLLATE "C" PRIMARY KEY,
    labels   text[] NOT NULL,
    minimums jsonb NOT NULL
);

-- The operators' controls (pause, a fleet-wide limit of jobs processing at once), per content type.
CREATE TABLE remote_job_types (
    content_type   text PRIMARY KEY,
    paused         boolean NOT NULL DEFAULT false,
    max_processing integer CHECK (max_processing >= 0),
    updated_at     timestamptz NOT NULL
);
