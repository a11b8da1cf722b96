-- The workers heard from (morag_remote/store/postgres/workers.py): one row per worker id, what it
-- last said it polls for and its metadata, and when it was last seen.
CREATE TABLE workers (
    worker_id     text COLLATE "C" PRIMARY KEY,
    last_seen     timestamptz NOT NULL,
    content_types jsonb NOT NULL DEFAULT '[]',
    metadata      jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX workers_last_seen ON workers (last_seen);
