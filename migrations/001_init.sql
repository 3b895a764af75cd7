-- Evidence store and classification results.
CREATE EXTENSION IF NOT EXISTS vector;

-- Chunks of the latest classified revision of each conversation (older revisions are replaced).
CREATE TABLE chunks (
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    revision        integer     NOT NULL,
    seq             integer     NOT NULL,
    chunk_id        text        NOT NULL,
    turn_ids        text[]      NOT NULL,
    speakers        text[]      NOT NULL,
    char_start      integer     NOT NULL,
    char_end        integer     NOT NULL,
    text            text        NOT NULL,
    embedder        text        NOT NULL,
    embedding       vector(384) NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, revision, seq)
);
-- Evidence retrieval is exact top-k within one conversation: a btree finds its few rows.
CREATE INDEX chunks_conversation ON chunks (tenant_id, conversation_id);

CREATE TABLE classifications (
    event_id        text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    revision        integer     NOT NULL,
    question_set    text        NOT NULL,
    answers         jsonb       NOT NULL,
    event           jsonb       NOT NULL,
    source_topic    text        NOT NULL,
    source_partition integer    NOT NULL,
    source_offset   bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX classifications_conversation ON classifications (tenant_id, conversation_id, revision);
