-- Trace context of a job (W3C `traceparent` and `tracestate`), fixed at submit: every span of
-- the job's life goes into this trace. NULL: none.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
ALTER TABLE jobs ADD COLUMN tracestate TEXT;
