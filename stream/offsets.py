"""Per-partition offset tracking: commit only the contiguous prefix of finished offsets.

Records of one partition finish out of order (a DLQ'd record before a slow batch, a retried batch
after a later one); the committable position is the first offset not yet finished, so a crash
never skips unfinished work.
"""

from __future__ import annotations

from collections import deque

from aiokafka.structs import TopicPartition


class PartitionOffsets:
    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # fetched offsets, ascending
        self._done: set[int] = set()
        self._next: int | None = None  # one past the last finished offset of the prefix
        self._committed: int | None = None

    def add(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} fetched after {self._pending[-1]}")
        self._pending.append(offset)

    def done(self, offset: int) -> None:
        if offset in self._done or not self._pending or offset < self._pending[0]:
            return
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            finished = self._pending.popleft()
            self._done.discard(finished)
            self._next = finished + 1

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def to_commit(self) -> int | None:
        """The position to commit now, or None when nothing new finished since the last commit."""
        if self._next is None or self._next == self._committed:
            return None
        return self._next

    def committed(self, position: int) -> None:
        self._committed = position


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionOffsets] = {}

    def assign(self, tps: set[TopicPartition] | frozenset[TopicPartition]) -> None:
        for tp in tps:
            self._parts.setdefault(tp, PartitionOffsets())

    def revoke(self, tps: set[TopicPartition] | frozenset[TopicPartition]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def add(self, tp: TopicPartition, offset: int) -> None:
        self._parts.setdefault(tp, PartitionOffsets()).add(offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None:  # a revoked partition's late result is not ours to commit
            part.done(offset)

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self._parts.values())

    def to_commit(
        self, only: set[TopicPartition] | frozenset[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        out = {}
        for tp, part in self._parts.items():
            if only is not None and tp not in only:
                continue
            pos = part.to_commit()
            if pos is not None:
                out[tp] = pos
        return out

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        for tp, pos in positions.items():
            if tp in self._parts:
                self._parts[tp].committed(pos)
