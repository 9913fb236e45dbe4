-- Usage queries read the ledger a page at a time in (hour, subject, mode)
-- order, filtered by tenant, pool or job.
CREATE INDEX ledger_pages ON ledger (hour_start_ms, subject, mode);
CREATE INDEX ledger_by_tenant ON ledger (tenant, hour_start_ms);
