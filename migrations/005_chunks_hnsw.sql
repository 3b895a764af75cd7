-- Corpus-wide search (`flexor search`): approximate nearest chunks across every conversation, by
-- cosine distance. Evidence retrieval stays exact within one conversation (chunks_conversation).
-- An HNSW build needs maintenance_work_mem of 1 GB or more to keep the graph in memory; with
-- less it spills and takes many times longer on a large table.
SET LOCAL maintenance_work_mem = '1GB';
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
