-- API keys: only the SHA-256 of a key is kept, as in <instance>/api_keys.json for the file store.
CREATE TABLE api_keys (
    name         text COLLATE "C" PRIMARY KEY,
    role         text NOT NULL,
    key_hash     text NOT NULL UNIQUE,
    worker_id    text,
    created_at   text,
    last_used_at text
);
