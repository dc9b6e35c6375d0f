-- Scheduling (capacity pools, resources, placement).

-- What a job needs besides a slot, fixed at submit: the engine's `Demand` (pools in fallback
-- order with units and max waits, resources, worker selector); `{}` for none.
ALTER TABLE jobs ADD COLUMN demand JSONB NOT NULL DEFAULT '{}';
-- The pool the current or last attempt took its capacity from.
ALTER TABLE jobs ADD COLUMN pool TEXT;

CREATE TABLE pools (
    namespace TEXT  NOT NULL,
    name      TEXT  NOT NULL,
    config    JSONB NOT NULL,                           -- the engine's `PoolConfig`
    PRIMARY KEY (namespace, name)
);
