-- The latest stored revision of each conversation, beside its chunks: turns, metadata and status,
-- so that training, evaluation and backfill can rebuild a conversation and reuse its stored chunk
-- embeddings instead of embedding it again (agents/store/conversations.py).
CREATE TABLE conversations (
    tenant_id       text        NOT NULL,
    conversation_id text        NOT NULL,
    revision        integer     NOT NULL,
    status          text        NOT NULL,
    occurred_at     timestamptz,
    metadata        jsonb       NOT NULL,
    turns           jsonb       NOT NULL,  -- [[turn_id, speaker, text], ...]
    embedder        text        NOT NULL,  -- the embedder of its chunks
    stored_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, conversation_id)
);
CREATE INDEX conversations_occurred_at ON conversations (occurred_at);
