-- Billing: subscription orders (refunds are negative orders) and the
-- hourly usage ledger, written idempotently per (subject, hour, mode).
CREATE TABLE orders (
    order_id      TEXT PRIMARY KEY,
    seq           BIGINT NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    pool_id       TEXT NOT NULL,
    data          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE ledger (
    subject       TEXT NOT NULL,
    hour_start_ms BIGINT NOT NULL,
    mode          TEXT NOT NULL,
    tenant        TEXT NOT NULL,
    pool_id       TEXT NOT NULL,
    job_id        TEXT NOT NULL,
    data          TEXT NOT NULL,
    PRIMARY KEY (subject, hour_start_ms, mode)
);

CREATE INDEX ledger_by_hour ON ledger (hour_start_ms);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
