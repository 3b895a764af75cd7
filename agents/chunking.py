"""Chunk a conversation into turn windows that keep turn ids and character offsets.

Offsets refer to the conversation's transcript: every turn rendered as ``speaker: text`` and
joined with newlines. A chunk's text is always ``transcript[char_start:char_end]``, so evidence
can be located and checked against the source without trusting the chunker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# One chunk per turn. A chunk's text then never changes once its turn is spoken, so a growing
# chat embeds only its new turn, and a turn repeated anywhere (greetings, macros, closings: 51 %
# of STAR's turns) is one cache hit (`agents.embedding_cache`). A 3-turn window changed with
# every turn and repeated only when all three turns did. On the shared data, heads on turns
# score as heads on 3-turn windows did (docs/accuracy.md); embedding 500 STAR conversations
# costs 9.5 s of turns against 8.0 s of windows from scratch, and 5.0 s once repeats are cached.
WINDOW_TURNS = 1
STRIDE_TURNS = 1
# A turn longer than this is cut into pieces (at whitespace when possible) so that one huge
# turn cannot push the rest of its window past the embedder's 256-token limit.
MAX_CHUNK_CHARS = 1200


# Speaker names that mean the customer side of a conversation; every other speaker is the agent.
CUSTOMER_SPEAKERS = frozenset({"user", "customer", "client", "caller"})


def is_customer(speaker: str) -> bool:
    return speaker.lower() in CUSTOMER_SPEAKERS


@dataclass(frozen=True, slots=True)
class Turn:
    turn_id: str
    speaker: str
    text: str

    @property
    def from_customer(self) -> bool:
        return is_customer(self.speaker)


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    turn_ids: tuple[str, ...]
    speakers: tuple[str, ...]
    char_start: int
    char_end: int
    text: str
    first_turn: int  # index of the first turn in the window (turn position feature)

    @property
    def from_customer(self) -> bool:
        """Whether a customer turn is in the chunk (with one chunk per turn: whether it is the customer's)."""
        return any(map(is_customer, self.speakers))


def render_turn(turn: Turn) -> str:
    return f"{turn.speaker}: {turn.text}"


def transcript(turns: Sequence[Turn]) -> str:
    return "\n".join(render_turn(t) for t in turns)


def _turn_spans(turns: Sequence[Turn]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for t in turns:
        end = pos + len(render_turn(t))
        spans.append((pos, end))
        pos = end + 1
    return spans


def _split_long(start: int, end: int, text: str) -> list[tuple[int, int]]:
    """Cut [start, end) of `text` into pieces of at most MAX_CHUNK_CHARS, preferring whitespace."""
    pieces = []
    while end - start > MAX_CHUNK_CHARS:
        cut = text.rfind(" ", start + MAX_CHUNK_CHARS // 2, start + MAX_CHUNK_CHARS)
        cut = cut if cut > start else start + MAX_CHUNK_CHARS
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def chunk_turns(
    turns: Sequence[Turn], window: int = WINDOW_TURNS, stride: int = STRIDE_TURNS
) -> list[Chunk]:
    if not turns:
        return []
    full = transcript(turns)
    spans = _turn_spans(turns)
    chunks: list[Chunk] = []
    last_start = max(len(turns) - window, 0)
    starts = list(range(0, last_start + 1, stride))
    if starts[-1] != last_start:
        starts.append(last_start)  # the tail of the conversation always gets a full window
    for first in starts:
        last = min(first + window, len(turns)) - 1
        start, end = spans[first][0], spans[last][1]
        if end - start <= MAX_CHUNK_CHARS:
            pieces = [(start, end, first, last)]
        else:
            pieces = []
            for i in range(first, last + 1):
                pieces += [(s, e, i, i) for s, e in _split_long(*spans[i], full)]
        for s, e, a, b in pieces:
            chunks.append(
                Chunk(
                    seq=len(chunks),
                    turn_ids=tuple(t.turn_id for t in turns[a : b + 1]),
                    speakers=tuple(t.speaker for t in turns[a : b + 1]),
                    char_start=s,
                    char_end=e,
                    text=full[s:e],
                    first_turn=a,
                )
            )
    return _dedupe(chunks)


def _dedupe(chunks: list[Chunk]) -> list[Chunk]:
    """Long turns split per turn can repeat a piece across overlapping windows; keep one."""
    seen: set[tuple[int, int]] = set()
    out = []
    for c in chunks:
        if (c.char_start, c.char_end) in seen:
            continue
        seen.add((c.char_start, c.char_end))
        out.append(
            Chunk(len(out), c.turn_ids, c.speakers, c.char_start, c.char_end, c.text, c.first_turn)
        )
    return out
