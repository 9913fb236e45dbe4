-- Leadership of scheduler replicas sharing one PostgreSQL database: one
-- row, held by the replica whose lease has not expired (database clock).
-- Every write transaction of the leader checks it still holds the lease.
CREATE TABLE leader (
    id            BIGINT PRIMARY KEY,
    holder        TEXT NOT NULL,
    address       TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
