-- LLM-stage result cache shared by replicas: P(yes) per (question version, evidence, model, template).
-- The key is a SHA-256 over all of those (agents/store/llm_results.py); the other columns are for people
-- reading the table and for pruning (e.g. DELETE ... WHERE model_id <> current, or by created_at).
CREATE TABLE llm_results (
    key              text             PRIMARY KEY,
    p_yes            double precision NOT NULL CHECK (p_yes >= 0 AND p_yes <= 1),
    question_id      text             NOT NULL,
    question_version integer          NOT NULL,
    model_id         text             NOT NULL,
    template_id      text             NOT NULL,
    created_at       timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX llm_results_created_at ON llm_results (created_at);
