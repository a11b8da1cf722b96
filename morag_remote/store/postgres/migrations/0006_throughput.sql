-- Jobs claimed, completed and failed per minute (morag_remote/throughput.py,
-- morag_remote/store/postgres/throughput.py): one row per UTC minute, added to with one atomic
-- increment per flush; minutes older than the retention (25 hours) are pruned, so the table stays
-- at about 1,500 rows.
CREATE TABLE throughput (
    minute      timestamptz PRIMARY KEY,
    claims      bigint NOT NULL DEFAULT 0,
    completions bigint NOT NULL DEFAULT 0,
    failures    bigint NOT NULL DEFAULT 0
);
