-- Idempotency-Key records (morag_remote/idempotency.py): one row per key and API key, written
-- ('reserved', naming the job id) and committed before the job is created, then marked 'done'.
-- key_id is the SHA-256 of the API key's name and the header's value; request is the validated
-- create request, from which a retry re-creates the job when its first creator died in between.
CREATE TABLE idempotency_keys (
    key_id      text COLLATE "C" PRIMARY KEY,
    fingerprint text NOT NULL,
    job_id      text NOT NULL,
    request     jsonb NOT NULL,
    created_at  timestamptz NOT NULL,
    state       text NOT NULL CHECK (state IN ('reserved', 'done'))
);
-- Purging the records older than the TTL, oldest first.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
