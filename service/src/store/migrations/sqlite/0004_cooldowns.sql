-- A pool's cooldown after an upstream rate limit outlives a restart (and, on PostgreSQL, a
-- change of leader): the end of the current cooldown (µs since the epoch) and the epoch count.
ALTER TABLE pools ADD COLUMN cooldown_until INTEGER;
ALTER TABLE pools ADD COLUMN cooldown_epoch INTEGER NOT NULL DEFAULT 0;
