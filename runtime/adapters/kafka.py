"""The Kafka bus: the production :class:`~imhub.runtime.ports.Bus` on confluent-kafka.

Built by :mod:`imhub.runtime.wiring` when ``IMHUB_KAFKA_BOOTSTRAP`` is set, and
used by the gateway (produce commands, consume ``im-events``) and by the message
and RTC services (consume commands, produce events).

Guarantees, in the terms of the port:

- ``produce`` returns only once the broker acknowledged the record (idempotent
  producer, ``acks=all``); when it cannot within ``message.timeout.ms`` it raises
  :class:`~imhub.runtime.errors.Unavailable`. librdkafka is driven by one poll
  thread; delivery reports resolve asyncio futures through
  ``call_soon_threadsafe``.
- Records are keyed by ``conv_id``: one conversation stays in one partition and
  keeps its order.
- Group consumers (message and RTC service) never auto-commit: ``commit`` stores
  exactly the offsets of the records handed to it (offset + 1 per partition),
  synchronously. They start a new group at the earliest offset and use static
  membership (``group.instance.id``), so a service restarted after ``kill -9``
  gets its partitions back without waiting for a rebalance.
- ``from_latest`` consumers (gateways) are not group members at all: they are
  assigned every partition at its current end, and ``ping`` reports ready only
  once those positions are fixed, so nothing produced after readiness is missed.

Every blocking librdkafka call runs on a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import admin as kafka_admin

from imhub.runtime import errors, ports

__all__ = ["KafkaBus", "KafkaConsumer"]

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.1
_ADMIN_TIMEOUT = 10.0
_COMMIT_ATTEMPTS = 3


class _LibrdkafkaLog:
    """librdkafka's log lines, into Python logging, capped at WARNING: what
    matters to the caller already surfaces as an exception or a callback.
    Connection failures (``FAIL``) repeat with every reconnect attempt while a
    broker is down; one line per client every 10 s is enough."""

    _logger = logging.getLogger(f"{__name__}.librdkafka")
    _EVERY = 10.0

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if args and args[0] == "FAIL":
            client = str(args[1]) if len(args) > 1 else ""
            now = time.monotonic()
            if now - self._last.get(client, -self._EVERY) < self._EVERY:
                self._suppressed[client] = self._suppressed.get(client, 0) + 1
                return
            self._last[client] = now
            skipped = self._suppressed.pop(client, 0)
            if skipped:
                fmt += f" ({skipped} more connection failures in the last {self._EVERY:.0f} s)"
        self._logger.log(min(level, logging.WARNING), fmt, *args)


def _is_fatal(err: confluent_kafka.KafkaError) -> bool:
    """A client that reported this must be replaced: it will not recover."""
    return bool(err.fatal()) or err.code() in (
        confluent_kafka.KafkaError._FATAL,
        confluent_kafka.KafkaError.FENCED_INSTANCE_ID,
    )


def _unavailable(what: str, err: Any) -> errors.Unavailable:
    text = err.str() if isinstance(err, confluent_kafka.KafkaError) else str(err)
    return errors.Unavailable(f"{what}: {text}")


class KafkaBus:
    """:class:`~imhub.runtime.ports.Bus` on Apache Kafka.

    Args:
        bootstrap: ``host:port[,host:port]`` of the brokers.
        client_id: names this process to the brokers; also the stable base of
            the static group membership id, so it must not change across restarts
            of the same instance (wiring derives it from ``--instance-id``).
        partitions: partitions of topics this bus creates.
        replication: replication factor of topics this bus creates.
        static_membership: set ``group.instance.id`` on group consumers.
        message_timeout_ms: how long a record may wait for the broker before
            ``produce`` gives up with ``Unavailable``.
        session_timeout_ms: group session timeout; a crashed member that does
            not come back loses its partitions after this long.
        config: extra librdkafka properties for every client (overrides).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        partitions: int = 8,
        replication: int = 1,
        static_membership: bool = True,
        message_timeout_ms: int = 8000,
        linger_ms: int = 2,
        session_timeout_ms: int = 6000,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if partitions < 1 or replication < 1:
            raise ValueError(
                f"partitions and replication must be >= 1, got {partitions}, {replication}"
            )
        self.bootstrap = bootstrap
        self.client_id = client_id
        self._partitions = partitions
        self._replication = replication
        self._static = static_membership
        self._session_timeout_ms = session_timeout_ms
        # librdkafka always reports within message.timeout.ms; the margin only
        # guards against a report that never comes.
        self._delivery_timeout = message_timeout_ms / 1000 + 5
        self._base: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "log.connection.close": False,
            "logger": _LibrdkafkaLog(),
            **(config or {}),
        }
        self._producer_config: dict[str, Any] = {
            **self._base,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "message.timeout.ms": message_timeout_ms,
            "error_cb": self._on_producer_error,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        # Delivery reports arrive on the poll thread; they are queued here and
        # settled on the loop in bulk, one wake-up per burst instead of one per
        # record.
        self._reports: collections.deque[
            tuple[asyncio.Future[None], confluent_kafka.KafkaError | None]
        ] = collections.deque()
        self._reports_lock = threading.Lock()
        self._reports_scheduled = False
        self._producer: confluent_kafka.Producer | None = None
        self._admin: kafka_admin.AdminClient | None = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fatal: confluent_kafka.KafkaError | None = None
        self._known_topics: set[str] = set()
        self._consumers: list[KafkaConsumer] = []

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._producer = confluent_kafka.Producer(self._producer_config)
        # The admin client's log lines would only be served by admin.poll(),
        # which nothing calls; its failures surface as exceptions anyway.
        admin_config = {k: v for k, v in self._base.items() if k != "logger"}
        self._admin = kafka_admin.AdminClient({**admin_config, "log_level": 2})
        self._stopping.clear()
        self._poller = threading.Thread(
            target=self._poll_loop, name=f"kafka-poll-{self.client_id}", daemon=True
        )
        self._poller.start()

    def _poll_loop(self) -> None:
        # Serves delivery reports and error callbacks; flush() in close() takes
        # over for the last ones.
        while not self._stopping.is_set():
            producer = self._producer
            if producer is None:
                break
            producer.poll(_POLL_INTERVAL)

    async def close(self) -> None:
        """Flush what was produced, close leftover consumers, release connections."""
        for consumer in list(self._consumers):
            await consumer.close()
        producer = self._producer
        if producer is None:
            return
        self._stopping.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5)
        left = await asyncio.to_thread(producer.flush, 10)
        if left:
            logger.warning("kafka: %d records were not delivered before close", left)
        self._producer = None
        self._admin = None

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the brokers answer and gateways' consumers
        are positioned (the readiness probe)."""
        admin = self._require_admin()
        try:
            await asyncio.to_thread(admin.list_topics, timeout=3)
        except confluent_kafka.KafkaException as exc:
            raise _unavailable("kafka is not reachable", exc.args[0]) from exc
        for consumer in list(self._consumers):
            await consumer.wait_positioned(2.0)

    def _require_admin(self) -> kafka_admin.AdminClient:
        if self._admin is None:
            raise RuntimeError("KafkaBus.start() was not called")
        return self._admin

    # -- topics -------------------------------------------------------------------

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet (idempotent)."""
        wanted = [t for t in dict.fromkeys(topics) if t not in self._known_topics]
        if not wanted:
            return
        await asyncio.to_thread(self._create_topics, wanted)
        self._known_topics.update(wanted)

    def _create_topics(self, topics: list[str]) -> None:
        admin = self._require_admin()
        try:
            existing = set(admin.list_topics(timeout=_ADMIN_TIMEOUT).topics)
        except confluent_kafka.KafkaException as exc:
            raise _unavailable("kafka is not reachable", exc.args[0]) from exc
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        futures = admin.create_topics(
            [
                # NewTopic is public API, but admin/__init__ re-exports it without
                # marking it so for type checkers.
                kafka_admin.NewTopic(  # type: ignore[attr-defined]
                    t, num_partitions=self._partitions, replication_factor=self._replication
                )
                for t in missing
            ],
            request_timeout=_ADMIN_TIMEOUT,
        )
        for topic, future in futures.items():
            try:
                future.result()
                logger.info("kafka: created topic %s (%d partitions)", topic, self._partitions)
            except confluent_kafka.KafkaException as exc:
                err = exc.args[0]
                if err.code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # someone else was quicker
                raise _unavailable(f"creating topic {topic} failed", err) from exc
        # Topic metadata propagates asynchronously; wait until the broker lists
        # them with a leader, so the first produce does not stall on metadata.
        deadline = time.monotonic() + _ADMIN_TIMEOUT
        while time.monotonic() < deadline:
            meta = admin.list_topics(timeout=_ADMIN_TIMEOUT).topics
            if all(
                t in meta
                and meta[t].error is None
                and meta[t].partitions
                and all(p.leader >= 0 for p in meta[t].partitions.values())
                for t in missing
            ):
                return
            time.sleep(0.1)

    # -- produce ------------------------------------------------------------------

    def _on_producer_error(self, err: confluent_kafka.KafkaError) -> None:
        # Called on the poll thread. Transport errors are retried by librdkafka
        # on its own; only a fatal error needs a new producer.
        if err.fatal():
            logger.error("kafka producer fatal error: %s", err.str())
            self._fatal = err
        else:
            logger.debug("kafka producer: %s", err.str())

    def _replace_fatal_producer(self) -> None:
        old, self._producer = self._producer, confluent_kafka.Producer(self._producer_config)
        self._fatal = None
        logger.warning("kafka: replaced the producer after a fatal error")
        if old is not None:
            old.purge()
            old.flush(0)  # serves the purged records' reports: their callers get errors

    async def produce(self, topic: str, key: str, value: bytes) -> None:
        """Return once the broker acknowledged the record; raise
        :class:`~imhub.runtime.errors.Unavailable` if it does not in time."""
        loop = self._loop
        if self._producer is None or loop is None:
            raise RuntimeError("KafkaBus.start() was not called")
        if self._fatal is not None:
            self._replace_fatal_producer()
        producer = self._producer
        assert producer is not None
        done: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: confluent_kafka.KafkaError | None, _msg: Any) -> None:
            self._reports.append((done, err))
            with self._reports_lock:
                if self._reports_scheduled:
                    return
                self._reports_scheduled = True
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._settle_reports)

        deadline = time.monotonic() + 5.0
        while True:
            try:
                producer.produce(topic, value=value, key=key.encode(), on_delivery=on_delivery)
                break
            except BufferError:
                # The local queue is full (broker down or slow): wait for room.
                if time.monotonic() > deadline:
                    raise errors.Unavailable("kafka producer queue is full") from None
                await asyncio.sleep(0.05)
            except confluent_kafka.KafkaException as exc:
                raise _unavailable("kafka refused the record", exc.args[0]) from exc
        try:
            async with asyncio.timeout(self._delivery_timeout):
                await done
        except TimeoutError:
            raise errors.Unavailable("kafka did not report the delivery in time") from None

    def _settle_reports(self) -> None:
        with self._reports_lock:
            self._reports_scheduled = False
        while self._reports:
            done, err = self._reports.popleft()
            _settle(done, err)

    # -- consume ------------------------------------------------------------------

    def consumer(
        self, topics: Sequence[str], group: str, *, from_latest: bool = False
    ) -> KafkaConsumer:
        config: dict[str, Any] = {
            **self._base,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest" if from_latest else "earliest",
            "session.timeout.ms": self._session_timeout_ms,
            "heartbeat.interval.ms": max(500, self._session_timeout_ms // 6),
            # A batch that keeps failing (database down) holds the partition
            # this long before the group moves it elsewhere.
            "max.poll.interval.ms": 120_000,
        }
        if self._static and not from_latest:
            config["group.instance.id"] = f"{self.client_id}.{group}"
        consumer = KafkaConsumer(self, config, list(topics), from_latest=from_latest)
        self._consumers.append(consumer)
        return consumer

    def _forget(self, consumer: KafkaConsumer) -> None:
        with contextlib.suppress(ValueError):
            self._consumers.remove(consumer)


def _settle(done: asyncio.Future[None], err: confluent_kafka.KafkaError | None) -> None:
    if done.done():
        return
    if err is None:
        done.set_result(None)
    else:
        done.set_exception(_unavailable("kafka did not accept the record", err))


class KafkaConsumer:
    """:class:`~imhub.runtime.ports.Consumer` on a confluent-kafka consumer.

    Calls into librdkafka are serialized by a lock and run on worker threads.
    """

    def __init__(
        self, bus: KafkaBus, config: dict[str, Any], topics: list[str], *, from_latest: bool
    ) -> None:
        self._bus = bus
        self._topics = topics
        self._from_latest = from_latest
        self._group = str(config["group.id"])
        self._config = config
        self._consumer = self._new_consumer()
        self._lock = asyncio.Lock()
        self._closed = False
        self._fatal: confluent_kafka.KafkaError | None = None
        self._stop = threading.Event()
        self.positioned = not from_latest
        self._setup: asyncio.Task[None] | None = None
        if from_latest:
            # Start positioning right away: readiness waits for it.
            self._setup = asyncio.get_running_loop().create_task(self._position_at_end())

    def _new_consumer(self) -> confluent_kafka.Consumer:
        consumer = confluent_kafka.Consumer(self._config)
        if not self._from_latest:
            consumer.subscribe(
                self._topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        return consumer

    def _replace(self) -> None:
        """Swap a consumer that hit a fatal error for a new one (same group and
        instance id). Static membership makes this necessary: after a broker
        restart the coordinator may hold a newer member id for our instance id
        and fence us (FENCED_INSTANCE_ID); a new consumer joins as that
        instance again and takes the partitions back. Its uncommitted records
        are redelivered, which the handlers tolerate."""
        old, err = self._consumer, self._fatal
        logger.error(
            "kafka group %s: consumer failed (%s); replacing it",
            self._group,
            err.str() if err is not None else "?",
        )
        with contextlib.suppress(confluent_kafka.KafkaException, RuntimeError):
            old.close()
        self._consumer = self._new_consumer()
        self._fatal = None
        if self._from_latest:
            self._assign_at_end()

    # -- group membership -------------------------------------------------------------

    def _on_assign(self, _consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        logger.info(
            "kafka group %s: assigned %s",
            self._group,
            ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing",
        )

    def _on_revoke(self, _consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        # Callbacks run inside poll(), and poll() is only called once the
        # previous batch was handled and committed, so nothing of these
        # partitions is in flight here: the next owner cannot process a record
        # concurrently with us.
        logger.info("kafka group %s: revoked %d partition(s)", self._group, len(partitions))

    def _on_lost(self, _consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        logger.warning(
            "kafka group %s: lost %d partition(s) (session expired); uncommitted records "
            "will be redelivered to their next owner",
            self._group,
            len(partitions),
        )

    async def _position_at_end(self) -> None:
        """Assign every partition of the topics at its current end offset."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                async with self._lock:
                    await asyncio.to_thread(self._assign_at_end)
                self.positioned = True
                return
            except (confluent_kafka.KafkaException, errors.Unavailable, KeyError) as exc:
                logger.warning("kafka: positioning %s failed, retrying: %s", self._group, exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    def _assign_at_end(self) -> None:
        assignment: list[confluent_kafka.TopicPartition] = []
        for topic in self._topics:
            meta = self._consumer.list_topics(topic, timeout=_ADMIN_TIMEOUT).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise errors.Unavailable(f"topic {topic} has no metadata yet")
            for index in sorted(meta.partitions):
                _low, high = self._consumer.get_watermark_offsets(
                    confluent_kafka.TopicPartition(topic, index), timeout=_ADMIN_TIMEOUT
                )
                assignment.append(confluent_kafka.TopicPartition(topic, index, high))
        self._consumer.assign(assignment)
        logger.info(
            "kafka: %s positioned at the end of %d partition(s)", self._group, len(assignment)
        )

    async def wait_positioned(self, timeout: float) -> None:
        """Raise ``Unavailable`` unless the consumer has its start positions."""
        if self._setup is not None and not self._setup.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._setup), timeout)
            except TimeoutError:
                raise errors.Unavailable("kafka consumer is not positioned yet") from None

    # -- port -------------------------------------------------------------------------

    async def poll(self, max_records: int, timeout: float) -> list[ports.Record]:
        if self._setup is not None and not self._setup.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._setup), timeout)
            except TimeoutError:
                return []
        async with self._lock:
            if self._closed:
                return []
            if self._fatal is not None:
                try:
                    await asyncio.to_thread(self._replace)
                except (confluent_kafka.KafkaException, errors.Unavailable, KeyError) as exc:
                    logger.warning(
                        "kafka group %s: replacing failed, retrying: %s", self._group, exc
                    )
                    await asyncio.sleep(min(timeout, 1.0))
                    return []
            return await asyncio.to_thread(self._consume, max_records, timeout)

    def _consume(self, max_records: int, timeout: float) -> list[ports.Record]:
        # consume(n, timeout) waits for n records or the whole timeout; poll()
        # returns as soon as one is there, then whatever is already fetched is
        # drained without waiting.
        try:
            first = self._consumer.poll(timeout)
            if first is None:
                return []
            batch = [first]
            if max_records > 1:
                batch += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        except confluent_kafka.KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, confluent_kafka.KafkaError) and _is_fatal(err):
                self._fatal = err
            logger.warning("kafka consume failed (retrying): %s", exc)
            return []
        out: list[ports.Record] = []
        for msg in batch:
            err = msg.error()
            if err is not None:
                if _is_fatal(err):
                    # Nothing after this from this consumer; the next poll
                    # replaces it. Records already taken are still good.
                    self._fatal = err
                    break
                logger.warning("kafka consume: %s", err.str())
                continue
            topic, partition, offset, key = msg.topic(), msg.partition(), msg.offset(), msg.key()
            if topic is None or partition is None or offset is None:
                continue  # only error events lack these
            out.append(
                ports.Record(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=key.decode() if isinstance(key, bytes) else (key or ""),
                    value=msg.value() or b"",
                )
            )
        return out

    async def commit(self, records: Sequence[ports.Record]) -> None:
        """Commit offset + 1 of the last of these records in each partition.

        A commit that fails (a rebalance moved the partition, or the broker is
        gone) is logged and dropped: the records are then delivered again, to us
        or to the next owner, and the handlers are idempotent.
        """
        if not records:
            return
        top: dict[tuple[str, int], int] = {}
        for rec in records:
            tp = (rec.topic, rec.partition)
            top[tp] = max(top.get(tp, -1), rec.offset)
        offsets = [confluent_kafka.TopicPartition(t, p, o + 1) for (t, p), o in top.items()]
        async with self._lock:
            if self._closed:
                return
            await asyncio.to_thread(self._commit_sync, offsets)

    def _commit_sync(self, offsets: list[confluent_kafka.TopicPartition]) -> None:
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
                return
            except confluent_kafka.KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, confluent_kafka.KafkaError) and _is_fatal(err):
                    self._fatal = err
                retriable = isinstance(err, confluent_kafka.KafkaError) and err.retriable()
                if retriable and attempt < _COMMIT_ATTEMPTS:
                    time.sleep(0.2 * attempt)
                    continue
                logger.warning(
                    "kafka group %s: commit failed, records will be redelivered: %s",
                    self._group,
                    exc,
                )
                return

    async def close(self) -> None:
        self._stop.set()
        if self._setup is not None:
            # Not cancelled: a cancelled task would leave its thread running
            # against a consumer that is being closed.
            await self._setup
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bus._forget(self)
            try:
                await asyncio.to_thread(self._consumer.close)
            except (confluent_kafka.KafkaException, RuntimeError) as exc:
                logger.warning("kafka: closing consumer %s: %s", self._group, exc)
