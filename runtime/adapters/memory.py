"""In-process bus and cache: the embedded default behind ``imhub serve``.

They keep the production semantics that services rely on: records with the
same key share a partition and keep their order, each consumer group has its
own committed offsets, and seq counters rebuild from the database when they
are missing. They are not durable: on restart the bus starts empty (every
acknowledged message is already in the database) and counters rebuild.
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from imhub.runtime import ports

__all__ = ["MemoryBus", "MemoryCache", "partition_for"]


def partition_for(key: str, partitions: int) -> int:
    # crc32 is stable across processes (unlike hash()), so tests and tools can
    # predict placement.
    return zlib.crc32(key.encode()) % partitions


class _Partition:
    __slots__ = ("base", "records")

    def __init__(self) -> None:
        self.base = 0  # offset of records[0]
        self.records: list[ports.Record] = []

    @property
    def end(self) -> int:
        return self.base + len(self.records)


class MemoryBus:
    """:class:`~imhub.runtime.ports.Bus` inside one process."""

    def __init__(self, *, partitions: int = 8) -> None:
        self._partitions = partitions
        self._topics: dict[str, list[_Partition]] = {}
        self._committed: dict[str, dict[tuple[str, int], int]] = {}  # group -> offsets
        self._waiters: set[asyncio.Event] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        for topic in topics:
            self._topic(topic)

    def _topic(self, topic: str) -> list[_Partition]:
        parts = self._topics.get(topic)
        if parts is None:
            parts = self._topics[topic] = [_Partition() for _ in range(self._partitions)]
        return parts

    async def produce(self, topic: str, key: str, value: bytes) -> None:
        parts = self._topic(topic)
        index = partition_for(key, len(parts))
        part = parts[index]
        part.records.append(ports.Record(topic, index, part.end, key, value))
        self._wake()

    def consumer(
        self, topics: Sequence[str], group: str, *, from_latest: bool = False
    ) -> MemoryConsumer:
        offsets = self._committed.setdefault(group, {})
        for topic in topics:
            for index, part in enumerate(self._topic(topic)):
                offsets.setdefault((topic, index), part.end if from_latest else part.base)
        return MemoryConsumer(self, list(topics), group)

    def _trim(self, topic: str, index: int) -> None:
        """Drop records every group has committed past, so memory stays bounded."""
        part = self._topics[topic][index]
        floor = min(
            (offs.get((topic, index), part.end) for offs in self._committed.values()),
            default=part.end,
        )
        drop = floor - part.base
        if drop > 256:
            del part.records[:drop]
            part.base = floor

    def lag(self, group: str) -> int:
        offsets = self._committed.get(group, {})
        return sum(
            self._topics[topic][index].end - offset for (topic, index), offset in offsets.items()
        )


class MemoryConsumer:
    def __init__(self, bus: MemoryBus, topics: list[str], group: str) -> None:
        self._bus = bus
        self._topics = topics
        self._group = group
        # Fetch position: ahead of the committed offset while records are in flight.
        self._position = dict(bus._committed[group])
        self._closed = False

    def _take(self, max_records: int) -> list[ports.Record]:
        out: list[ports.Record] = []
        for topic in self._topics:
            for index, part in enumerate(self._bus._topic(topic)):
                pos = max(self._position.get((topic, index), part.base), part.base)
                if pos >= part.end:
                    continue
                chunk = part.records[pos - part.base : pos - part.base + max_records - len(out)]
                out.extend(chunk)
                self._position[(topic, index)] = pos + len(chunk)
                if len(out) >= max_records:
                    return out
        return out

    async def poll(self, max_records: int, timeout: float) -> list[ports.Record]:
        if self._closed:
            return []
        records = self._take(max_records)
        if records:
            return records
        deadline = time.monotonic() + timeout
        waiter = asyncio.Event()
        self._bus._waiters.add(waiter)
        try:
            while not self._closed:
                waiter.clear()  # before looking, so a produce in between still wakes us
                records = self._take(max_records)
                if records:
                    return records
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                try:
                    await asyncio.wait_for(waiter.wait(), remaining)
                except TimeoutError:
                    return []
        finally:
            self._bus._waiters.discard(waiter)
        return []

    async def commit(self, records: Sequence[ports.Record]) -> None:
        committed = self._bus._committed[self._group]
        for rec in records:
            tp = (rec.topic, rec.partition)
            if rec.offset + 1 > committed.get(tp, 0):
                committed[tp] = rec.offset + 1
        for topic, index in {(r.topic, r.partition) for r in records}:
            self._bus._trim(topic, index)

    async def close(self) -> None:
        self._closed = True
        # A closed consumer's uncommitted records are redelivered to the group.
        self._bus._wake()


class MemoryCache:
    """:class:`~imhub.runtime.ports.Cache` inside one process."""

    def __init__(self) -> None:
        self._seq: dict[tuple[str, str], int] = {}
        self._seq_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._online: dict[tuple[str, str], dict[str, float]] = {}
        self._values: dict[tuple[str, str], tuple[Any, float]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def flush(self) -> None:
        """Forget everything, as a Redis FLUSHALL would (used by tests)."""
        self._seq.clear()
        self._online.clear()
        self._values.clear()

    async def allocate_seq(
        self,
        tenant_id: str,
        conv_id: str,
        count: int,
        stored_max: Callable[[], Awaitable[int]],
    ) -> int:
        key = (tenant_id, conv_id)
        if key not in self._seq:
            lock = self._seq_locks.setdefault(key, asyncio.Lock())
            async with lock:
                if key not in self._seq:
                    self._seq[key] = await stored_max()
        first = self._seq[key] + 1
        self._seq[key] += count
        return first

    async def allocate_seqs(
        self,
        tenant_id: str,
        counts: Mapping[str, int],
        stored_max: Callable[[str], Awaitable[int]],
    ) -> dict[str, int]:
        return {
            conv_id: await self.allocate_seq(
                tenant_id, conv_id, count, functools.partial(stored_max, conv_id)
            )
            for conv_id, count in counts.items()
        }

    async def reset_seq(self, tenant_id: str, conv_id: str, floor: int) -> None:
        key = (tenant_id, conv_id)
        self._seq[key] = max(self._seq.get(key, 0), floor)

    async def release_seq(self, tenant_id: str, conv_id: str, first: int, count: int) -> None:
        key = (tenant_id, conv_id)
        if self._seq.get(key) == first + count - 1:
            self._seq[key] = first - 1

    async def set_online(self, tenant_id: str, user_id: str, instance_id: str, ttl: float) -> None:
        self._online.setdefault((tenant_id, user_id), {})[instance_id] = time.monotonic() + ttl

    async def set_offline(self, tenant_id: str, user_id: str, instance_id: str) -> None:
        instances = self._online.get((tenant_id, user_id))
        if instances is not None:
            instances.pop(instance_id, None)
            if not instances:
                del self._online[(tenant_id, user_id)]

    async def online_instances(self, tenant_id: str, user_id: str) -> list[str]:
        now = time.monotonic()
        instances = self._online.get((tenant_id, user_id), {})
        return sorted(i for i, expiry in instances.items() if expiry > now)

    async def get_json(self, tenant_id: str, key: str) -> Any | None:
        entry = self._values.get((tenant_id, key))
        if entry is None or entry[1] < time.monotonic():
            self._values.pop((tenant_id, key), None)
            return None
        return entry[0]

    async def set_json(self, tenant_id: str, key: str, value: Any, ttl: float) -> None:
        self._values[(tenant_id, key)] = (value, time.monotonic() + ttl)

    async def delete(self, tenant_id: str, key: str) -> None:
        self._values.pop((tenant_id, key), None)
