-- Chunks of an open revision (a chat still growing) are replaced by the next revision's within
-- minutes, and with one chunk per turn a chat of n turns writes about n^2/2 such rows. Adding
-- each to the corpus-search HNSW graph cost more than embedding its turn (7,430 chunks of 500 STAR
-- conversations: 12 s with the index against 0.2 s without), so the index holds only the chunks
-- of revisions that are not open, and `flexor search` searches those.
ALTER TABLE chunks ADD COLUMN open boolean NOT NULL DEFAULT false;
DROP INDEX chunks_embedding_hnsw;
SET LOCAL maintenance_work_mem = '1GB';
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops) WHERE NOT open;
