-- Tenants, their API token hashes, and dedicated pools.
CREATE TABLE tenants (
    name          TEXT PRIMARY KEY,
    data          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Only the SHA-256 of each token is kept.
CREATE TABLE tokens (
    token_sha256  TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL REFERENCES tenants (name),
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE pools (
    pool_id       TEXT PRIMARY KEY,
    seq           BIGINT NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    status        TEXT NOT NULL,
    data          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
