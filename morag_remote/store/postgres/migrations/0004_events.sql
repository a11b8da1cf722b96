-- The completion-events outbox (morag_remote/store/postgres/outbox.py): one row per event, the columns
-- that claims, purges and counts filter and order on, and the whole Event as JSONB (``doc``, what
-- ``Event.to_dict`` returns), which is what reads return.
CREATE TABLE event_outbox (
    id              text COLLATE "C" PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('pending', 'delivered')),
    webhook_url     text,                      -- NULL: the configured CALLBACK_URL
    created_at      timestamptz NOT NULL,
    next_attempt_at timestamptz,               -- the backoff schedule (NULL: due now)
    -- schedule order, the outbox's claim order: the next attempt, else the recording
    due_at          timestamptz NOT NULL GENERATED ALWAYS AS (coalesce(next_attempt_at, created_at)) STORED,
    claimed_until   timestamptz,               -- an attempt in flight until then
    delivered_at    timestamptz,
    doc             jsonb NOT NULL
);

-- Claims: pending events in schedule order, walked with FOR UPDATE SKIP LOCKED.
CREATE INDEX event_outbox_claim ON event_outbox (due_at, created_at, id) WHERE state = 'pending';
-- Retention: delivered events by delivery time.
CREATE INDEX event_outbox_delivered ON event_outbox (delivered_at) WHERE state = 'delivered';

-- How far reconciliation has looked (delivery.py): one row, moved forward only.
CREATE TABLE event_checkpoint (
    only_row           boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    reconciled_through timestamptz NOT NULL,
    after_id           text COLLATE "C"
);
