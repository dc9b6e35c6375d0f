-- Several instances on one database: the one that holds the advisory lock leads. Its row here
-- names it for the others (they forward calls to `addr`) and carries the epoch every commit of
-- the leader checks (`SELECT … FOR SHARE`), so a deposed leader can never commit again.
CREATE TABLE jobplane_leader (
    id smallint PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL,
    addr text NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);
INSERT INTO jobplane_leader (id, epoch, addr) VALUES (1, 0, '');
