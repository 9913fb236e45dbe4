-- The audit trail: one row per mutating call (domain/audit.rs), written in
-- the transaction of the change it describes. The target columns are
-- empty strings when the call had no such target.
CREATE TABLE audit (
    seq     BIGINT PRIMARY KEY,
    at_ms   BIGINT NOT NULL,
    tenant  TEXT NOT NULL,
    pool_id TEXT NOT NULL,
    job_id  TEXT NOT NULL,
    node_id TEXT NOT NULL,
    data    TEXT NOT NULL
);

CREATE INDEX audit_by_tenant ON audit (tenant, seq);
CREATE INDEX audit_by_time ON audit (at_ms);
