"""Chunking: turn windows (one turn by default) whose offsets always point back into the transcript."""

from __future__ import annotations

import itertools
import random

import pytest

from agents.chunking import MAX_CHUNK_CHARS, STRIDE_TURNS, WINDOW_TURNS, Chunk, Turn, chunk_turns, transcript


def conv(n: int, text: str = "turn number {i} says something short") -> list[Turn]:
    return [Turn(f"t{i}", "customer" if i % 2 == 0 else "agent", text.format(i=i)) for i in range(n)]


def check_invariants(turns: list[Turn], chunks: list[Chunk]) -> None:
    """What every consumer of chunks relies on, for any input."""
    full = transcript(turns)
    ids = [t.turn_id for t in turns]
    for i, c in enumerate(chunks):
        assert c.seq == i
        assert 0 <= c.char_start < c.char_end <= len(full)
        assert c.text == full[c.char_start : c.char_end]
        assert len(c.text) <= MAX_CHUNK_CHARS
        assert c.turn_ids, c
        first = ids.index(c.turn_ids[0])
        assert c.first_turn == first
        assert list(c.turn_ids) == ids[first : first + len(c.turn_ids)]  # contiguous, in order
        assert c.speakers == tuple(t.speaker for t in turns[first : first + len(c.turn_ids)])
    assert len({(c.char_start, c.char_end) for c in chunks}) == len(chunks)  # no duplicates


def test_transcript_format() -> None:
    turns = [Turn("a", "customer", "hi"), Turn("b", "agent", "hello")]
    assert transcript(turns) == "customer: hi\nagent: hello"


def test_empty_turns() -> None:
    assert chunk_turns([]) == []


def test_single_turn() -> None:
    turns = [Turn("only", "customer", "my card was charged twice")]
    (c,) = chunk_turns(turns)
    assert c.turn_ids == ("only",)
    assert c.speakers == ("customer",)
    assert (c.char_start, c.char_end) == (0, len("customer: my card was charged twice"))
    assert c.text == "customer: my card was charged twice"
    assert c.first_turn == 0
    assert c.seq == 0


def test_one_chunk_per_turn_by_default() -> None:
    assert (WINDOW_TURNS, STRIDE_TURNS) == (1, 1)
    turns = conv(4)
    chunks = chunk_turns(turns)
    check_invariants(turns, chunks)
    assert [c.turn_ids for c in chunks] == [("t0",), ("t1",), ("t2",), ("t3",)]
    assert [c.text for c in chunks] == transcript(turns).split("\n")


@pytest.mark.parametrize("n", range(1, 12))
def test_a_growing_chat_keeps_its_earlier_chunks(n: int) -> None:
    # What lets a new revision embed only its new turn (issue 14): the chunks of a prefix are
    # the first chunks of the longer conversation, text and offsets alike.
    turns = conv(12)
    assert chunk_turns(turns[:n]) == chunk_turns(turns)[:n]


def test_two_turns_is_one_window_of_three() -> None:
    turns = conv(2)
    (c,) = chunk_turns(turns, window=3, stride=3)
    assert c.turn_ids == ("t0", "t1")
    assert c.text == transcript(turns)


def test_windows_of_three_do_not_overlap() -> None:
    turns = conv(9)
    chunks = chunk_turns(turns, window=3, stride=3)
    check_invariants(turns, chunks)
    assert [c.turn_ids for c in chunks] == [
        ("t0", "t1", "t2"),
        ("t3", "t4", "t5"),
        ("t6", "t7", "t8"),
    ]
    assert chunks[1].char_start > chunks[0].char_end  # each turn is embedded once


def test_overlapping_windows_share_characters() -> None:
    turns = conv(7)
    chunks = chunk_turns(turns, window=3, stride=2)
    check_invariants(turns, chunks)
    assert [c.first_turn for c in chunks] == [0, 2, 4]
    assert chunks[1].char_start < chunks[0].char_end


def test_tail_window_is_a_full_window() -> None:
    turns = conv(7)  # starts 0, 3 then the tail 4 (not 6, which would leave a 1-turn window)
    chunks = chunk_turns(turns, window=3, stride=3)
    check_invariants(turns, chunks)
    assert [c.turn_ids for c in chunks] == [
        ("t0", "t1", "t2"),
        ("t3", "t4", "t5"),
        ("t4", "t5", "t6"),
    ]
    assert chunks[-1].char_end == len(transcript(turns))


@pytest.mark.parametrize("n", range(1, 40))
def test_every_turn_is_covered(n: int) -> None:
    turns = conv(n)
    chunks = chunk_turns(turns)
    check_invariants(turns, chunks)
    covered = {tid for c in chunks for tid in c.turn_ids}
    assert covered == {t.turn_id for t in turns}
    assert chunks[0].char_start == 0
    assert chunks[-1].char_end == len(transcript(turns))
    if n >= WINDOW_TURNS:
        assert all(len(c.turn_ids) == WINDOW_TURNS for c in chunks)


def test_custom_window_and_stride() -> None:
    turns = conv(5)
    chunks = chunk_turns(turns, window=2, stride=1)
    check_invariants(turns, chunks)
    assert [c.turn_ids for c in chunks] == [("t0", "t1"), ("t1", "t2"), ("t2", "t3"), ("t3", "t4")]


def test_very_long_turn_is_split_into_pieces_with_matching_offsets() -> None:
    words = " ".join(f"word{i}" for i in range(2_000))  # ~17k characters
    turns = [Turn("t0", "customer", "short opening"), Turn("t1", "customer", words), Turn("t2", "agent", "ok")]
    chunks = chunk_turns(turns)
    check_invariants(turns, chunks)
    long_pieces = [c for c in chunks if c.turn_ids == ("t1",)]
    assert len(long_pieces) >= len(words) // MAX_CHUNK_CHARS
    # the pieces tile the long turn exactly, in order, without gaps or overlaps
    full = transcript(turns)
    start = full.index("customer: word0")
    end = start + len("customer: ") + len(words)
    assert long_pieces[0].char_start == start
    assert long_pieces[-1].char_end == end
    for a, b in itertools.pairwise(long_pieces):
        assert a.char_end == b.char_start
    # cuts prefer whitespace: no word is cut in half
    for a in long_pieces[:-1]:
        assert full[a.char_end] == " "
    # the short turns are still covered
    assert {"t0", "t2"} <= {tid for c in chunks for tid in c.turn_ids}


def test_long_turn_without_spaces_is_hard_cut() -> None:
    blob = "x" * (MAX_CHUNK_CHARS * 3 + 7)
    turns = [Turn("t0", "customer", blob)]
    chunks = chunk_turns(turns)
    check_invariants(turns, chunks)
    assert sum(len(c.text) for c in chunks) == len(transcript(turns))
    assert all(len(c.text) <= MAX_CHUNK_CHARS for c in chunks)
    assert len(chunks) == 4


def test_window_exactly_at_the_limit_is_not_split() -> None:
    head = "customer: "
    turns = [Turn("t0", "customer", "y" * (MAX_CHUNK_CHARS - len(head)))]
    (c,) = chunk_turns(turns)
    assert len(c.text) == MAX_CHUNK_CHARS


def test_chunking_is_deterministic() -> None:
    turns = conv(9)
    assert chunk_turns(turns) == chunk_turns(list(turns))


def test_random_conversations_keep_the_invariants() -> None:
    rng = random.Random(7)
    vocab = ["refund", "charged", "twice", "error", "thanks", "", "  ", "\n", "ok", "é", "日本"]
    for _ in range(200):
        n = rng.randint(1, 12)
        turns = []
        for i in range(n):
            size = rng.choice([0, 1, 5, 50, 400, 1500, 4000])
            text = " ".join(rng.choice(vocab) for _ in range(size))
            if rng.random() < 0.1:
                text = "z" * size * 3  # no whitespace at all
            turns.append(Turn(f"id-{i}", rng.choice(["customer", "agent", "bot"]), text))
        chunks = chunk_turns(turns)
        check_invariants(turns, chunks)
        assert {tid for c in chunks for tid in c.turn_ids} == {t.turn_id for t in turns}
