-- Nodes and jobs. Rows carry the domain object as JSON (`data`) plus the
-- columns queries filter on.
CREATE TABLE nodes (
    node_id       TEXT PRIMARY KEY,
    data          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE jobs (
    job_id        TEXT PRIMARY KEY,
    seq           BIGINT NOT NULL UNIQUE,
    state         TEXT NOT NULL,
    data          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX jobs_by_state ON jobs (state);
