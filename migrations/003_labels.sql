-- Labels: the one source of labels for training, evaluation and audit. One label per
-- (tenant, conversation, revision, question id, question version); a label from a source of
-- higher precedence (human > import > teacher:<model id>) replaces one of lower or equal
-- precedence, never the other way round (agents/store/labels.py).
CREATE TABLE labels (
    tenant_id        text        NOT NULL,
    conversation_id  text        NOT NULL,
    revision         integer     NOT NULL,
    question_id      text        NOT NULL,
    question_version integer     NOT NULL,
    answer           text        NOT NULL CHECK (answer IN ('yes', 'no')),
    source           text        NOT NULL CHECK (source IN ('human', 'import') OR source LIKE 'teacher:_%'),
    given_by         text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, conversation_id, revision, question_id, question_version)
);
CREATE INDEX labels_question ON labels (question_id, question_version);
