"""Offsets: only the contiguous prefix of finished offsets is committable, per partition."""

from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from stream.offsets import OffsetTracker, PartitionOffsets

TP0 = TopicPartition("conversations", 0)
TP1 = TopicPartition("conversations", 1)
TP_OTHER = TopicPartition("other", 0)


def commit(t: OffsetTracker) -> dict[TopicPartition, int]:
    """What the service does: read the positions, commit them, tell the tracker."""
    positions = t.to_commit()
    t.committed(positions)
    return positions


# -- PartitionOffsets -------------------------------------------------------------------------------


def test_nothing_to_commit_before_anything_finishes() -> None:
    p = PartitionOffsets()
    assert p.to_commit() is None
    for o in (5, 6, 7):
        p.add(o)
    assert p.to_commit() is None
    assert p.in_flight == 3


def test_gap_holds_the_commit_until_it_is_filled() -> None:
    p = PartitionOffsets()
    for o in (5, 6, 7):
        p.add(o)
    p.done(5)
    assert p.to_commit() == 6
    p.committed(6)
    p.done(7)  # 6 is still running: committing 8 would skip it after a crash
    assert p.to_commit() is None
    assert p.in_flight == 2
    p.done(6)
    assert p.to_commit() == 8
    assert p.in_flight == 0


def test_out_of_order_finish_before_first_commit() -> None:
    p = PartitionOffsets()
    for o in (5, 6, 7):
        p.add(o)
    p.done(7)
    p.done(6)
    assert p.to_commit() is None  # 5 not finished
    p.done(5)
    assert p.to_commit() == 8


def test_to_commit_is_none_when_nothing_new_finished() -> None:
    p = PartitionOffsets()
    p.add(0)
    p.done(0)
    assert p.to_commit() == 1
    assert p.to_commit() == 1  # reading is not committing
    p.committed(1)
    assert p.to_commit() is None
    p.add(1)
    assert p.to_commit() is None
    p.done(1)
    assert p.to_commit() == 2


def test_sparse_offsets_commit_one_past_the_last_finished() -> None:
    # compacted topics and transaction markers leave holes in the offset sequence
    p = PartitionOffsets()
    for o in (10, 14, 20):
        p.add(o)
    p.done(10)
    assert p.to_commit() == 11
    p.done(20)
    assert p.to_commit() == 11
    p.done(14)
    assert p.to_commit() == 21


def test_duplicate_and_stale_done_are_ignored() -> None:
    p = PartitionOffsets()
    for o in (1, 2, 3):
        p.add(o)
    p.done(1)
    p.done(1)
    p.done(0)  # never fetched, below the window
    assert p.to_commit() == 2
    assert p.in_flight == 2
    p.done(3)
    p.done(3)
    assert p.to_commit() == 2
    p.done(2)
    assert p.to_commit() == 4


@pytest.mark.parametrize("offsets", [(5, 5), (5, 4), (5, 6, 6)])
def test_out_of_order_add_raises(offsets: tuple[int, ...]) -> None:
    p = PartitionOffsets()
    with pytest.raises(ValueError):
        for o in offsets:
            p.add(o)


def test_add_after_the_window_drained_still_must_grow() -> None:
    p = PartitionOffsets()
    p.add(3)
    p.done(3)
    p.add(4)  # fine
    p.done(4)
    assert p.to_commit() == 5


# -- OffsetTracker ----------------------------------------------------------------------------------


def test_tracker_gap_scenario() -> None:
    t = OffsetTracker()
    t.assign({TP0})
    for o in (5, 6, 7):
        t.add(TP0, o)
    assert t.to_commit() == {}
    t.done(TP0, 5)
    t.done(TP0, 7)
    assert commit(t) == {TP0: 6}
    assert t.to_commit() == {}
    t.done(TP0, 6)
    assert commit(t) == {TP0: 8}
    assert t.to_commit() == {}


def test_partitions_are_independent() -> None:
    t = OffsetTracker()
    t.assign({TP0, TP1, TP_OTHER})
    for o in range(3):
        t.add(TP0, o)
        t.add(TP1, 100 + o)
        t.add(TP_OTHER, 50 + o)
    assert t.in_flight == 9
    t.done(TP1, 100)
    t.done(TP1, 101)
    t.done(TP0, 1)  # gap at TP0:0
    t.done(TP_OTHER, 50)
    assert commit(t) == {TP1: 102, TP_OTHER: 51}
    assert t.in_flight == 6
    t.done(TP0, 0)
    assert commit(t) == {TP0: 2}
    assert t.in_flight == 4


def test_to_commit_only_filters_partitions() -> None:
    t = OffsetTracker()
    t.assign({TP0, TP1})
    t.add(TP0, 0)
    t.add(TP1, 0)
    t.done(TP0, 0)
    t.done(TP1, 0)
    assert t.to_commit(only={TP1}) == {TP1: 1}
    assert t.to_commit(only=frozenset()) == {}
    assert t.to_commit() == {TP0: 1, TP1: 1}


def test_revoked_partition_late_done_is_ignored_and_never_committed() -> None:
    t = OffsetTracker()
    t.assign({TP0, TP1})
    for o in (0, 1):
        t.add(TP0, o)
        t.add(TP1, o)
    t.done(TP0, 0)
    t.revoke({TP0})
    assert not t.owns(TP0)
    assert t.owns(TP1)
    assert t.in_flight == 2  # the revoked partition's work no longer counts
    t.done(TP0, 1)  # a late result of a revoked partition
    assert TP0 not in t.to_commit()
    t.committed({TP0: 2})  # a stray commit report for it changes nothing
    assert t.to_commit() == {}
    t.done(TP1, 0)
    assert t.to_commit() == {TP1: 1}


def test_reassigned_partition_starts_fresh() -> None:
    t = OffsetTracker()
    t.assign({TP0})
    t.add(TP0, 0)
    t.done(TP0, 0)
    assert commit(t) == {TP0: 1}
    t.revoke({TP0})
    t.assign({TP0})
    assert t.owns(TP0)
    assert t.to_commit() == {}
    assert t.in_flight == 0
    t.add(TP0, 1)  # fetching resumes at the committed position
    t.done(TP0, 1)
    assert t.to_commit() == {TP0: 2}


def test_assign_keeps_existing_state() -> None:
    t = OffsetTracker()
    t.assign({TP0})
    t.add(TP0, 0)
    t.assign({TP0, TP1})  # an incremental assignment must not reset in-flight work
    assert t.in_flight == 1
    t.done(TP0, 0)
    assert t.to_commit() == {TP0: 1}


def test_tracker_out_of_order_add_raises() -> None:
    t = OffsetTracker()
    t.assign({TP0})
    t.add(TP0, 10)
    with pytest.raises(ValueError):
        t.add(TP0, 9)
    t.add(TP1, 3)  # another partition has its own sequence
    assert t.in_flight == 2


def test_revoke_of_unknown_partition_is_harmless() -> None:
    t = OffsetTracker()
    t.revoke({TP0})
    t.done(TP0, 0)
    assert t.to_commit() == {}
    assert t.in_flight == 0
