"""Conversation features from chunk embeddings, shared by training and the head scorer.

A head sees only what the pipeline already computed: the chunks (speakers, turn positions)
and their L2-normalised embeddings. FEATURE_VERSION names the exact recipe; a head trained
on one version refuses to score with another.

Recipe ``f5`` (one row per conversation) is ``f4``'s plus the phrase bank per side: per phrase
the max and the mean over the customer's chunks, and the same over the agent's. "Is there
anything else?" is a request for other options from the customer and a sign-off from the agent;
``f4`` matched both sides at once. With 200 labels per question, replayed in memory over three
selection seeds, it lifted the four behaviour questions (failed booking, asked for
alternatives, annoyed, changed their mind) by 0.010 of macro-F1; ``flexor bench --learn`` over
three seeds did not confirm it (0.830 against ``f4``'s 0.834 at 200 labels, ``docs/learning.md``).
``f4`` is ``f3``'s on one chunk per turn (``f3``'s chunks were 3-turn windows: a head of either
version would read the other's vectors wrongly, so it refuses):
- pooled chunk embeddings: mean and max over the conversation's chunks. (``f2`` also had the
  opening chunk, the closing chunk and the last quarter's mean: better in-domain, but on the
  evaluation split's multi-service conversations it missed intents that come second, e.g.
  q04 F1 0.937 vs 0.978; position now enters only through the bank's closing-chunk stats);
- a bank of generic dialogue-act phrasings (apologies, failures, requests for other options,
  annoyance, changes of mind, thanks, ...) matched against every chunk: per phrase the max,
  the mean, the max over the closing chunks, and the max minus mean (a peaked event vs a
  topic that runs through the conversation). The bank is fixed text, the same for every
  question; nothing in it is fitted to a question id or a label;
- shape: log turn count, log chunk count, user share of turns, log mean turn length.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from agents.stacked import StackedChunks, rowwise
from agents.types import EmbeddedConversation
from models.embedder import Embedder

FEATURE_VERSION = "f5"

# Generic phrasings of dialogue acts, written once for all questions (speaker prefixes match
# the chunk text format "speaker: text"; user/assistant/system names differ per source, so
# phrasings are given without the prefix).
PHRASE_BANK: tuple[str, ...] = (
    "Sorry, that did not work. The booking failed.",
    "I'm sorry, I was unable to complete the transaction. Would you like to try something else?",
    "Unfortunately there is no availability at that time.",
    "I could not find anything matching your request.",
    "Your reservation is confirmed. It was successful.",
    "The transfer went through successfully.",
    "Can you show me some other options?",
    "Is there anything else available? Something different please.",
    "Do you have any other suggestions?",
    "What else do you have?",
    "This is ridiculous, you are useless and not helping me at all!",
    "I'm getting really annoyed, just do what I asked.",
    "Ugh, hurry up. Why is this so hard?",
    "Actually, I changed my mind. Let's do something else instead.",
    "Wait, no, I want a different one instead.",
    "Can you change that? I'd prefer another time.",
    "Thank you so much, that's everything I needed.",
    "Great, thanks for your help. Goodbye.",
    "That doesn't help me. I still don't have what I need.",
    "I'm sorry, I can't help you with that.",
    "I can't do that, it is not possible.",
    "Could you confirm the details please?",
    "Yes, that's correct, please go ahead.",
    "No, that is not right.",
    "I need to know your name and account number.",
    "Hello, how can I help you today?",
    "Is there anything else I can help you with?",
    "I want to book a reservation.",
    "I would like to cancel.",
    "Someone used my card without permission.",
    "I'd like to order something.",
    "Could you tell me more about it?",
)
TAIL_CHUNKS = 2


class FeatureExtractor:
    """Turns embedded conversations into feature rows; embeds the phrase bank once per embedder."""

    version = FEATURE_VERSION

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.model_id = embedder.model_id
        self._bank: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def bank(self) -> np.ndarray:
        with self._lock:
            if self._bank is None:
                self._bank = np.asarray(self.embedder.embed(list(PHRASE_BANK)), np.float32)
            return self._bank

    @property
    def dim(self) -> int:
        d = self.embedder.dim
        return 2 * d + 8 * len(PHRASE_BANK) + 4

    def transform(self, convs: Sequence[EmbeddedConversation]) -> np.ndarray:
        """One row per conversation (zeros for a conversation without chunks). The batch's chunks
        meet the phrase bank in one matrix product; each row depends on its conversation alone."""
        d, p = self.embedder.dim, len(PHRASE_BANK)
        out = np.zeros((len(convs), self.dim), np.float32)
        if not convs:
            return out
        stacked = StackedChunks.of(convs, d)
        vectors = stacked.vectors.astype(np.float64)
        sims = rowwise(vectors, self.bank.T.astype(np.float64))  # (chunks, phrases)
        o = 2 * d
        out[:, 0:d] = stacked.mean(vectors)
        out[:, d:o] = stacked.max(stacked.vectors)
        mx, mn = stacked.max(sims), stacked.mean(sims)
        out[:, o : o + p] = mx
        out[:, o + p : o + 2 * p] = mn
        out[:, o + 2 * p : o + 3 * p] = stacked.tail_max(sims, TAIL_CHUNKS)
        out[:, o + 3 * p : o + 4 * p] = mx - mn
        customer = np.fromiter((ch.from_customer for ec in convs for ch in ec.chunks), bool, count=len(sims))
        for k, keep in enumerate((customer, ~customer)):
            side = stacked.select(keep)
            out[:, o + (4 + 2 * k) * p : o + (5 + 2 * k) * p] = side.max(sims[keep])
            out[:, o + (5 + 2 * k) * p : o + (6 + 2 * k) * p] = side.mean(sims[keep])
        for i, ec in enumerate(convs):
            if not stacked.counts[i]:
                continue
            turns = ec.conversation.turns
            n = max(len(turns), 1)
            first = turns[0].speaker if turns else ""
            out[i, o + 8 * p :] = (
                np.log1p(len(turns)),
                np.log1p(stacked.counts[i]),
                sum(t.speaker == first for t in turns) / n,
                np.log1p(sum(len(t.text) for t in turns) / n),
            )
        return out
