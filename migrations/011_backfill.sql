-- Backfill jobs (`flexor backfill`, stream/backfill.py): one row per job, written by the command
-- as it enqueues work items on the backfill topic; one row per work item that a replica has
-- finished, or dead-lettered after it raised twice (`failed`; a replay that succeeds clears it). Progress is the share of a job's items present here: upserted by item, so an item
-- redelivered after a crash counts once.
CREATE TABLE backfill_jobs (
    job_id        text        PRIMARY KEY,
    question_set  text        NOT NULL,  -- the question-set version the job was planned with
    questions     text[]      NOT NULL,  -- "id@version" of the questions it answers
    tenant_id     text,
    since         timestamptz,
    items         integer     NOT NULL DEFAULT 0,  -- work items enqueued so far
    conversations integer     NOT NULL DEFAULT 0,  -- conversations in those items
    enqueued_at   timestamptz,                     -- set once every item is enqueued
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE backfill_items (
    job_id        text        NOT NULL,
    item          integer     NOT NULL,
    conversations integer     NOT NULL,
    published     integer     NOT NULL,  -- classification events produced
    skipped       integer     NOT NULL,  -- answered already, replaced by a newer revision, or refused
    failed        boolean     NOT NULL DEFAULT false,  -- raised twice: in the DLQ (processing_error)
    done_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, item)
);
