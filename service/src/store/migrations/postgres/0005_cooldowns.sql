-- A pool's cooldown after an upstream rate limit outlives a restart and a change of leader:
-- the end of the current cooldown (µs since the epoch) and the epoch count.
ALTER TABLE pools ADD COLUMN cooldown_until bigint;
ALTER TABLE pools ADD COLUMN cooldown_epoch bigint NOT NULL DEFAULT 0;
