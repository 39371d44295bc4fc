"""Kafka provisioning: the tenant's three topics, their partitions and retention.

Uses confluent-kafka's AdminClient. Its calls block (they return futures
resolved by librdkafka's threads), so each pass runs in a worker thread.
Partitions only grow (Kafka cannot remove them; the CRD refuses a decrease);
a topic deleted by hand is created again on the next pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

__all__ = ["TopicProvisioner", "TopicsResult", "TopicsUnavailable"]

logger = logging.getLogger(__name__)


class TopicsUnavailable(Exception):
    """The Kafka cluster did not answer in time."""


@dataclasses.dataclass(slots=True)
class TopicsResult:
    topics: list[str]
    partitions: dict[str, int] = dataclasses.field(default_factory=dict)
    created: list[str] = dataclasses.field(default_factory=list)
    grown: list[str] = dataclasses.field(default_factory=list)
    reconfigured: list[str] = dataclasses.field(default_factory=list)
    too_many_partitions: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.topics)} topics"]
        for label, items in (
            ("created", self.created),
            ("partitions raised", self.grown),
            ("retention updated", self.reconfigured),
        ):
            if items:
                parts.append(f"{label}: {', '.join(items)}")
        if self.too_many_partitions:
            parts.append(
                "more partitions than requested (Kafka cannot shrink): "
                + ", ".join(self.too_many_partitions)
            )
        return "; ".join(parts)


class TopicProvisioner:
    def __init__(self, bootstrap: str, *, timeout: float = 5.0) -> None:
        self._bootstrap = bootstrap
        self._timeout = timeout

    def _admin(self) -> Any:
        return AdminClient(
            {
                "bootstrap.servers": self._bootstrap,
                "client.id": "imhub-operator",
                "socket.timeout.ms": int(self._timeout * 1000),
                "socket.connection.setup.timeout.ms": int(self._timeout * 1000),
                "reconnect.backoff.max.ms": 1000,
                "log_level": 3,
            }
        )

    def _metadata(self, admin: Any) -> Any:
        try:
            return admin.list_topics(timeout=self._timeout)
        except KafkaException as exc:
            raise TopicsUnavailable(f"Kafka at {self._bootstrap} did not answer: {exc}") from exc

    async def ensure(
        self,
        topics: Sequence[str],
        *,
        partitions: int,
        retention_ms: int,
        replication_factor: int = 1,
    ) -> TopicsResult:
        return await asyncio.to_thread(
            self._ensure, list(topics), partitions, retention_ms, replication_factor
        )

    def _ensure(
        self, topics: list[str], partitions: int, retention_ms: int, replication_factor: int
    ) -> TopicsResult:
        admin = self._admin()
        result = TopicsResult(topics=topics)
        existing = {name: len(t.partitions) for name, t in self._metadata(admin).topics.items()}

        missing = [t for t in topics if t not in existing]
        if missing:
            new = [
                NewTopic(
                    t,
                    num_partitions=partitions,
                    replication_factor=replication_factor,
                    config={"retention.ms": str(retention_ms)},
                )
                for t in missing
            ]
            for name, fut in admin.create_topics(new, request_timeout=self._timeout).items():
                try:
                    fut.result(timeout=self._timeout * 2)
                    result.created.append(name)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise self._wrap(exc, f"creating {name}") from exc
                existing[name] = partitions

        to_grow = [t for t in topics if existing[t] < partitions]
        if to_grow:
            futures = admin.create_partitions(
                [NewPartitions(t, partitions) for t in to_grow], request_timeout=self._timeout
            )
            for name, fut in futures.items():
                try:
                    fut.result(timeout=self._timeout * 2)
                except KafkaException as exc:
                    raise self._wrap(exc, f"adding partitions to {name}") from exc
                result.grown.append(name)
                existing[name] = partitions
        result.too_many_partitions = [t for t in topics if existing[t] > partitions]
        result.partitions = {t: existing[t] for t in topics}

        result.reconfigured = self._ensure_retention(
            admin, [t for t in topics if t not in result.created], retention_ms
        )
        return result

    def _ensure_retention(self, admin: Any, topics: list[str], retention_ms: int) -> list[str]:
        if not topics:
            return []
        wanted = str(retention_ms)
        described = admin.describe_configs(
            [ConfigResource(ResourceType.TOPIC, t) for t in topics],
            request_timeout=self._timeout,
        )
        stale = []
        for resource, fut in described.items():
            try:
                entries = fut.result(timeout=self._timeout * 2)
            except KafkaException as exc:
                raise self._wrap(exc, f"reading config of {resource.name}") from exc
            entry = entries.get("retention.ms")
            if entry is None or entry.value != wanted:
                stale.append(resource.name)
        if stale:
            resources = [
                ConfigResource(
                    ResourceType.TOPIC,
                    t,
                    incremental_configs=[
                        ConfigEntry(
                            "retention.ms", wanted, incremental_operation=AlterConfigOpType.SET
                        )
                    ],
                )
                for t in stale
            ]
            altered = admin.incremental_alter_configs(resources, request_timeout=self._timeout)
            for resource, fut in altered.items():
                try:
                    fut.result(timeout=self._timeout * 2)
                except KafkaException as exc:
                    raise self._wrap(exc, f"setting retention of {resource.name}") from exc
        return stale

    def _wrap(self, exc: KafkaException, doing: str) -> Exception:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and (err.retriable() or err.code() in _UNAVAILABLE):
            return TopicsUnavailable(f"{doing}: {err.str()}")
        return RuntimeError(f"{doing}: {exc}")

    async def missing(self, topics: Sequence[str]) -> list[str]:
        """Topics that do not exist (drift probe)."""

        def probe() -> list[str]:
            present = self._metadata(self._admin()).topics
            return [t for t in topics if t not in present]

        return await asyncio.to_thread(probe)

    async def delete(self, topics: Sequence[str]) -> list[str]:
        """Delete the topics; returns those that existed."""

        def run() -> list[str]:
            admin = self._admin()
            present = self._metadata(admin).topics
            doomed = [t for t in topics if t in present]
            if not doomed:
                return []
            for name, fut in admin.delete_topics(doomed, request_timeout=self._timeout).items():
                try:
                    fut.result(timeout=self._timeout * 2)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise self._wrap(exc, f"deleting {name}") from exc
            return doomed

        return await asyncio.to_thread(run)


_UNAVAILABLE = {
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_CONTROLLER,
}
