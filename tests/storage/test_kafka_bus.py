"""The Kafka bus on a real broker: ordering, commit semantics, positions, outages."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence

import confluent_kafka
import pytest
from confluent_kafka import admin as kafka_admin

from imhub.runtime import errors, ports
from imhub.runtime.adapters import kafka
from tests.realservices import ServiceSet

pytestmark = pytest.mark.services


def _topic() -> str:
    return f"imhub.test-{secrets.token_hex(4)}.im-messages"


async def _drain(
    consumer: ports.Consumer, count: int, *, timeout: float = 20.0
) -> list[ports.Record]:
    out: list[ports.Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        out += await consumer.poll(500, 0.5)
    return out


async def _quiet(consumer: ports.Consumer, seconds: float = 1.5) -> list[ports.Record]:
    """Whatever arrives within ``seconds`` (expected: nothing)."""
    out: list[ports.Record] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += await consumer.poll(500, 0.3)
    return out


def _values(records: Sequence[ports.Record]) -> list[str]:
    return [r.value.decode() for r in records]


async def test_ensure_topics_creates_partitions_once(bus: kafka.KafkaBus) -> None:
    topic = _topic()
    await bus.ensure_topics([topic])
    await bus.ensure_topics([topic])  # idempotent
    # A second bus (another process) finds it existing.
    other = kafka.KafkaBus(bus.bootstrap, client_id="other", partitions=4)
    await other.start()
    try:
        await other.ensure_topics([topic])
    finally:
        await other.close()
    admin = kafka_admin.AdminClient({"bootstrap.servers": bus.bootstrap})
    meta = await asyncio.to_thread(admin.list_topics, topic, 10)
    assert len(meta.topics[topic].partitions) == 4


async def test_records_with_one_key_keep_their_order(bus: kafka.KafkaBus) -> None:
    topic = _topic()
    await bus.ensure_topics([topic])
    keys = [f"c_{i}" for i in range(6)]
    # Produced concurrently, as a gateway does for many connections.
    await asyncio.gather(
        *(bus.produce(topic, keys[i % 6], f"{keys[i % 6]}:{i // 6}".encode()) for i in range(300))
    )
    consumer = bus.consumer([topic], f"g-{secrets.token_hex(3)}")
    try:
        records = await _drain(consumer, 300)
    finally:
        await consumer.close()
    assert len(records) == 300
    by_key: dict[str, list[ports.Record]] = {}
    for rec in records:
        by_key.setdefault(rec.key, []).append(rec)
    assert sorted(by_key) == keys
    for key, recs in by_key.items():
        assert len({r.partition for r in recs}) == 1  # one key, one partition
        assert [int(v.split(":")[1]) for v in _values(recs)] == list(range(50)), key
        assert [r.offset for r in recs] == sorted(r.offset for r in recs)
    assert len({recs[0].partition for recs in by_key.values()}) > 1  # keys spread out


async def test_uncommitted_records_go_to_the_next_consumer(bus: kafka.KafkaBus) -> None:
    topic, group = _topic(), f"g-{secrets.token_hex(3)}"
    await bus.ensure_topics([topic])
    for i in range(40):
        await bus.produce(topic, "c_one", f"{i}".encode())

    first = bus.consumer([topic], group)
    got = await _drain(first, 40)
    assert _values(got) == [str(i) for i in range(40)]
    # The handler finished the first 25 only, then the process went away.
    await first.commit(got[:25])
    await first.close()

    second = bus.consumer([topic], group)
    try:
        again = await _drain(second, 15)
        assert _values(again) == [str(i) for i in range(25, 40)]
        await second.commit(again)
        assert await _quiet(second) == []
    finally:
        await second.close()

    # The committed offset is exactly the last handled record + 1.
    raw = confluent_kafka.Consumer({"bootstrap.servers": bus.bootstrap, "group.id": group})
    try:
        part = again[-1].partition
        committed = await asyncio.to_thread(
            raw.committed, [confluent_kafka.TopicPartition(topic, part)], 10
        )
        assert committed[0].offset == again[-1].offset + 1
    finally:
        await asyncio.to_thread(raw.close)

    # A third consumer of the group starts after everything: nothing is redelivered.
    third = bus.consumer([topic], group)
    try:
        assert await _quiet(third, 3.0) == []
    finally:
        await third.close()


async def test_new_group_reads_from_the_start_and_from_latest_skips_the_past(
    bus: kafka.KafkaBus,
) -> None:
    topic = _topic()
    await bus.ensure_topics([topic])
    for i in range(10):
        await bus.produce(topic, f"c_{i % 3}", f"old{i}".encode())

    latest = bus.consumer([topic], f"gw-{secrets.token_hex(3)}", from_latest=True)
    earliest = bus.consumer([topic], f"svc-{secrets.token_hex(3)}")
    try:
        await bus.ping()  # readiness: the gateway's consumer has its positions
        for i in range(5):
            await bus.produce(topic, f"c_{i % 3}", f"new{i}".encode())
        fresh = await _drain(latest, 5)
        assert sorted(_values(fresh)) == [f"new{i}" for i in range(5)]
        assert await _quiet(latest, 1.0) == []
        everything = await _drain(earliest, 15)
        assert sorted(_values(everything)) == sorted(
            [f"old{i}" for i in range(10)] + [f"new{i}" for i in range(5)]
        )
    finally:
        await latest.close()
        await earliest.close()


async def test_static_member_restarted_takes_its_partitions_back(kafka_bootstrap: str) -> None:
    """A service killed without leaving the group comes back under the same
    instance id and gets its partitions at once, not after the session timeout."""
    topic, group = _topic(), f"svc-{secrets.token_hex(3)}"
    client_id = f"imhub-svc-{secrets.token_hex(3)}"
    old = kafka.KafkaBus(kafka_bootstrap, client_id=client_id, partitions=2)
    await old.start()
    await old.ensure_topics([topic])
    await old.produce(topic, "c_a", b"before")
    consumer = old.consumer([topic], group)
    assert _values(await _drain(consumer, 1)) == ["before"]
    # "kill -9": no commit, no leave (a static member never leaves on close).
    await consumer.close()
    await old.close()

    new = kafka.KafkaBus(kafka_bootstrap, client_id=client_id, partitions=2)
    await new.start()
    consumer = new.consumer([topic], group)
    try:
        started = time.monotonic()
        again = await _drain(consumer, 1, timeout=20)
        assert _values(again) == ["before"]  # uncommitted: delivered again
        assert time.monotonic() - started < 5.0
    finally:
        await consumer.close()
        await new.close()


async def test_produce_during_broker_outage_is_unavailable(
    services: ServiceSet, kafka_bootstrap: str
) -> None:
    topic = _topic()
    bus = kafka.KafkaBus(kafka_bootstrap, client_id="outage", partitions=2, message_timeout_ms=3000)
    await bus.start()
    try:
        await bus.ensure_topics([topic])
        await bus.produce(topic, "c_a", b"before")

        await asyncio.to_thread(services.stop, "kafka")
        started = time.monotonic()
        with pytest.raises(errors.Unavailable):
            await bus.produce(topic, "c_a", b"during")
        assert time.monotonic() - started < 6.0
        with pytest.raises(errors.Unavailable):
            await bus.ping()

        env = await asyncio.to_thread(services.start, "kafka")
        assert env["KAFKA_BOOTSTRAP"] == kafka_bootstrap
        # The same producer recovers once the broker is back.
        deadline = time.monotonic() + 30
        while True:
            try:
                await bus.produce(topic, "c_a", b"after")
                break
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
        await bus.ping()
        consumer = bus.consumer([topic], f"g-{secrets.token_hex(3)}")
        try:
            values = _values(await _drain(consumer, 2))
        finally:
            await consumer.close()
        # "during" was refused, so it is not there (a timed out record that the
        # broker did write would be allowed, but this one never left the client).
        assert values[0] == "before" and values[-1] == "after"
        assert values.count("after") == 1
    finally:
        await bus.close()


async def test_fenced_static_member_replaces_itself(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a broker restart the coordinator may hold a newer member id for our
    static instance id and fence us (a fatal error in librdkafka); the consumer
    must come back on its own instead of going quiet forever."""
    caplog.set_level(logging.ERROR, logger="imhub.runtime.adapters.kafka")
    topic, group = _topic(), f"svc-{secrets.token_hex(3)}"
    client_id = f"imhub-svc-{secrets.token_hex(3)}"
    bus = kafka.KafkaBus(kafka_bootstrap, client_id=client_id, partitions=1)
    await bus.start()
    try:
        await bus.ensure_topics([topic])
        await bus.produce(topic, "c_a", b"one")
        consumer = bus.consumer([topic], group)
        assert _values(await _drain(consumer, 1)) == ["one"]

        # Another consumer joins under the same instance id and fences ours.
        ghost = confluent_kafka.Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": group,
                "group.instance.id": f"{client_id}.{group}",
                "session.timeout.ms": 6000,
                "enable.auto.commit": False,
            }
        )
        ghost.subscribe([topic])
        deadline = time.monotonic() + 20
        while not ghost.assignment() and time.monotonic() < deadline:
            await asyncio.to_thread(ghost.poll, 0.2)
        assert ghost.assignment()
        await asyncio.to_thread(ghost.close)

        await bus.produce(topic, "c_a", b"two")
        # Ours notices, replaces itself and gets the uncommitted records again.
        again = await _drain(consumer, 2, timeout=30)
        assert _values(again)[-2:] == ["one", "two"] or _values(again) == ["two"]
        assert any("replacing it" in r.getMessage() for r in caplog.records)
        await consumer.commit(again)
        await consumer.close()
    finally:
        await bus.close()
