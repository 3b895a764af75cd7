-- Dead letters put back on the input topic by `flexor dlq replay`: one row per DLQ record, claimed
-- before it is produced, so no DLQ offset is ever replayed twice, whatever filters or runs follow.
CREATE TABLE dlq_replays (
    dlq_topic     text        NOT NULL,
    dlq_partition integer     NOT NULL,
    dlq_offset    bigint      NOT NULL,
    reason        text        NOT NULL,
    replayed_to   text        NOT NULL,
    replayed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
