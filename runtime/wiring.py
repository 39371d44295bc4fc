"""Builds the runtime from settings: adapters, services and their tasks.

One :class:`Runtime` serves any mix of roles (gateway, message service, RTC
service). Empty backend settings mean the embedded default; production
adapters are imported only when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from imhub.runtime import auth, errors, ports, settings, tenancy, tenants
from imhub.runtime.adapters import media, memory, store, webhook
from imhub.runtime.services import messages, push, rtc

__all__ = ["ROLES", "Runtime"]

logger = logging.getLogger(__name__)

ROLES = ("gateway", "message-service", "rtc-service")


class Runtime:
    def __init__(
        self,
        config: settings.Settings,
        registry: tenants.TenantRegistry,
        *,
        roles: Iterable[str] = ROLES,
        bus: ports.Bus | None = None,
        cache: ports.Cache | None = None,
        auto_migrate: bool | None = None,
        demo: bool = False,
    ) -> None:
        self.config = config
        self.registry = registry
        self.roles = frozenset(roles)
        unknown = self.roles - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {sorted(unknown)}")
        if not len(registry):
            raise ValueError("no tenants configured")
        self.demo = demo
        self.verifier = auth.TokenVerifier(registry)
        self.database_url = config.effective_database_url()
        self.store = store.SqlStore(store.make_engine(self.database_url))
        self.cache: ports.Cache = cache or self._make_cache()
        self.bus: ports.Bus = bus or self._make_bus()
        self.media: ports.ObjectStore = self._make_media()
        self.auto_migrate = (
            self.database_url.startswith("sqlite") if auto_migrate is None else auto_migrate
        )
        self.stop_event = asyncio.Event()
        self._webhooks: webhook.HttpWebhookSender | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- construction -------------------------------------------------------------

    def _make_cache(self) -> ports.Cache:
        if self.config.redis_url:
            from imhub.runtime.adapters import redis as redis_adapter

            return redis_adapter.RedisCache(self.config.redis_url)
        return memory.MemoryCache()

    def _make_bus(self) -> ports.Bus:
        if self.config.kafka_bootstrap:
            from imhub.runtime.adapters import kafka

            return kafka.KafkaBus(
                self.config.kafka_bootstrap,
                client_id=f"imhub-{self.config.instance_id}",
                partitions=self.config.bus_partitions,
                replication=self.config.kafka_replication_factor,
            )
        if "message-service" not in self.roles or "gateway" not in self.roles:
            raise ValueError(
                "split roles need a shared bus: set IMHUB_KAFKA_BOOTSTRAP (the in-process "
                "bus only connects roles inside one process)"
            )
        return memory.MemoryBus(partitions=self.config.bus_partitions)

    def _make_media(self) -> ports.ObjectStore:
        if self.config.s3_endpoint:
            from imhub.runtime.adapters import s3

            return s3.S3MediaStore(
                endpoint=self.config.s3_endpoint,
                public_endpoint=self.config.s3_public_endpoint,
                access_key=self.config.s3_access_key or "",
                secret_key=self.config.s3_secret_key or "",
                region=self.config.s3_region,
            )
        secret = media.load_or_create_secret(self.config.data_dir / "media.key")
        return media.LocalMediaStore(
            self.config.data_dir / "media",
            secret=secret,
            public_url=self.config.public_url,
        )

    def consumer_group(self, service: str) -> str:
        prefix = self.config.consumer_group_prefix
        if prefix is None:
            ids = self.registry.ids()
            prefix = tenancy.names_for(ids[0]).topic_prefix if len(ids) == 1 else "imhub"
        return f"{prefix}.{service}"

    def tenant(self, tenant_id: str) -> tenants.Tenant:
        tenant = self.registry.get(tenant_id)
        if tenant is None:  # a verified token always names a configured tenant
            raise errors.Unauthorized("unknown tenant")
        return tenant

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        if self.auto_migrate:
            from imhub import migrations

            if self.database_url.startswith("sqlite"):
                await migrations.upgrade_async(self.database_url)
            else:
                for tenant in self.registry:
                    await migrations.upgrade_async(self.database_url, schema=tenant.names.db_schema)
        await self.store.start()
        await self.cache.start()
        await self.bus.start()
        await self.media.start()
        for tenant in self.registry:
            await self.media.ensure_tenant(tenant.tenant_id)
        await self.bus.ensure_topics([t for tn in self.registry for t in tn.names.topics])

        if "message-service" in self.roles:
            notifier = None
            if any(t.webhook_url for t in self.registry):
                self._webhooks = webhook.HttpWebhookSender()
                await self._webhooks.start()
                notifier = push.OfflinePush(
                    registry=self.registry, cache=self.cache, sender=self._webhooks
                )
            svc = messages.MessageService(
                registry=self.registry,
                store=self.store,
                cache=self.cache,
                bus=self.bus,
                notifier=notifier,
                batch=self.config.consumer_batch,
            )
            self.spawn(
                svc.run(self.stop_event, group=self.consumer_group("message-service")),
                "message-service",
            )
        if "rtc-service" in self.roles:
            rtc_svc = rtc.RtcService(
                registry=self.registry, store=self.store, cache=self.cache, bus=self.bus
            )
            self.spawn(
                rtc_svc.run(self.stop_event, group=self.consumer_group("rtc-service")),
                "rtc-service",
            )
        logger.info(
            "runtime started", extra={"roles": sorted(self.roles), "tenants": self.registry.ids()}
        )

    def spawn(self, coro: Any, name: str) -> None:
        """Run ``coro`` until :meth:`stop`; a crash is logged and fails readiness."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stop_event.is_set():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("task %s died: %r", task.get_name(), exc, exc_info=exc)

    def healthy(self) -> bool:
        return all(not t.done() for t in self._tasks)

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"tasks": self.healthy()}
        for name, probe in (("database", self.store.ping), ("cache", self.cache.ping)):
            try:
                await asyncio.wait_for(probe(), 3)
                checks[name] = True
            except (errors.ImhubError, TimeoutError, OSError):
                checks[name] = False
        ping_bus = getattr(self.bus, "ping", None)
        if ping_bus is not None:
            try:
                await asyncio.wait_for(ping_bus(), 3)
                checks["bus"] = True
            except (errors.ImhubError, TimeoutError, OSError):
                checks["bus"] = False
        return checks

    async def stop(self) -> None:
        self.stop_event.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        if self._webhooks is not None:
            await self._webhooks.close()
        await self.bus.close()
        await self.cache.close()
        await self.media.close()
        await self.store.close()
