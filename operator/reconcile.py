"""One reconcile pass for an ``ImTenant``, and the cleanup when it is deleted.

Called by the kopf handlers in :mod:`imhub.operator.handlers` (create,
update, resume and the drift timer all run the same pass). Each component is
a step that reports an :class:`~imhub.operator.status.Outcome`; a failing
backend never stops the others, and never raises out of here: the caller gets
the new status and decides whether to retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from imhub.operator import config as config_mod
from imhub.operator import credentials, database, render, status, storage, topics, turn, workloads
from imhub.operator import kube as kube_mod
from imhub.operator import spec as spec_mod

__all__ = ["Backends", "CleanupReport", "PassResult", "Reconciler"]

logger = logging.getLogger(__name__)

# (type "Normal"|"Warning", reason, message)
EventFn = Callable[[str, str, str], None]


@dataclasses.dataclass(slots=True)
class Backends:
    """Provisioners for the backends the operator manages; ``None`` = not managed."""

    database: database.DatabaseProvisioner | None = None
    topics: topics.TopicProvisioner | None = None
    storage: storage.StorageProvisioner | None = None
    turn: turn.TurnProvisioner | None = None

    @classmethod
    def from_config(cls, config: config_mod.OperatorConfig) -> Backends:
        t = config.backend_timeout
        return cls(
            database=(
                database.DatabaseProvisioner(config.database_url, timeout=t)
                if config.database_url
                else None
            ),
            topics=(
                topics.TopicProvisioner(config.kafka_bootstrap, timeout=t)
                if config.kafka_bootstrap
                else None
            ),
            storage=(
                storage.StorageProvisioner(
                    endpoint=config.s3_endpoint,
                    access_key=config.s3_access_key or "",
                    secret_key=config.s3_secret_key or "",
                    region=config.s3_region,
                    timeout=t,
                )
                if config.s3_endpoint
                else None
            ),
            turn=(
                turn.TurnProvisioner(config.turn_db, config.turn_realm, timeout=t)
                if config.turn_db
                else None
            ),
        )


Outcome = status.Outcome


@dataclasses.dataclass(slots=True)
class PassResult:
    status: dict[str, Any]
    ready: bool
    failed: list[Outcome]


@dataclasses.dataclass(slots=True)
class CleanupReport:
    done: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def _not_managed(component: str, setting: str) -> status.Outcome:
    return status.Outcome(
        component, True, "NotManaged", f"{setting} is not set; the operator does not manage it"
    )


class Reconciler:
    def __init__(
        self,
        config: config_mod.OperatorConfig,
        kube: kube_mod.Kube,
        backends: Backends,
    ) -> None:
        self.config = config
        self.kube = kube
        self.backends = backends
        self._locks: dict[str, asyncio.Lock] = {}
        # uids seen holding their tenant id's claim (database schema comment):
        # lets the other steps go on while PostgreSQL is briefly unreachable.
        self._claimed: set[str] = set()

    def lock(self, uid: str) -> asyncio.Lock:
        """Handlers and the timer of one object never run a pass at the same time."""
        return self._locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        self._locks.pop(uid, None)
        self._claimed.discard(uid)

    async def _alive(self, namespace: str, name: str, uid: str) -> bool:
        """Does the ImTenant namespace/name with this uid still exist? (unsure: yes)"""
        try:
            obj = await self.kube.get("ImTenant", namespace, name)
        except Exception:  # noqa: BLE001 - when in doubt the holder is alive
            return True
        return obj is not None and obj["metadata"].get("uid") == uid

    # -- reconcile ----------------------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], event: EventFn) -> PassResult:
        """One pass; the status is read and written under the object's lock.

        Handlers and the timer may hold stale copies of the object, so the pass
        starts from a fresh read and writes the status itself before releasing
        the lock: two passes can never land their status out of order.
        """
        meta = body["metadata"]
        async with self.lock(meta["uid"]):
            fresh = await self.kube.get("ImTenant", meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                return PassResult({}, True, [])  # deleted meanwhile: nothing to do
            if fresh["metadata"].get("deletionTimestamp"):
                return PassResult(fresh.get("status") or {}, True, [])
            result = await self._reconcile(fresh, event)
            await self.write_status(fresh, result.status)
        return result

    async def write_status(self, obj: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        try:
            await self.kube.merge_patch(
                "ImTenant", meta["namespace"], meta["name"], {"status": new}, subresource="status"
            )
        except kube_mod.ApiError as exc:
            # The next pass (retry or timer) writes it again.
            logger.warning(
                "writing status of %s/%s failed: %s", meta["namespace"], meta["name"], exc
            )

    async def _reconcile(self, body: Mapping[str, Any], event: EventFn) -> PassResult:
        meta = body["metadata"]
        namespace, generation = meta["namespace"], meta.get("generation")
        old_status = body.get("status") or {}
        try:
            spec = spec_mod.parse_spec(body.get("spec") or {})
        except spec_mod.InvalidSpec as exc:
            outcome = status.Outcome("Credentials", False, "InvalidSpec", str(exc))
            new = status.build_status(
                old_status, [outcome], generation=generation, endpoints={}, resources={}
            )
            self._announce(old_status, [outcome], event)
            return PassResult(new, False, [outcome])

        outcomes, resources = await self._steps(body, spec, event)
        new = status.build_status(
            old_status,
            outcomes,
            generation=generation,
            endpoints=render.endpoints(spec, self.config, namespace),
            resources=resources,
        )
        self._announce(old_status, outcomes, event)
        failed = [o for o in outcomes if not o.ok]
        if not failed and old_status.get("phase") != "Ready":
            event("Normal", "Ready", f"tenant {spec.tenant_id} is provisioned")
        return PassResult(new, not failed, failed)

    def _announce(
        self, old_status: Mapping[str, Any], outcomes: list[status.Outcome], event: EventFn
    ) -> None:
        """A Warning event when a component newly fails or fails differently."""
        old = old_status.get("conditions") or []
        for outcome in outcomes:
            if outcome.ok:
                continue
            before = status.condition(old, outcome.type)
            if (
                before is None
                or before.get("status") != "False"
                or (before.get("reason") != outcome.reason)
            ):
                event("Warning", outcome.reason, f"{outcome.type}: {outcome.message}")

    async def _steps(
        self, body: Mapping[str, Any], spec: spec_mod.TenantSpec, event: EventFn
    ) -> tuple[list[status.Outcome], dict[str, Any]]:
        meta = body["metadata"]
        namespace, uid = meta["namespace"], meta["uid"]
        names = spec.names
        resources: dict[str, Any] = {"secret": names.k8s_secret}
        outcomes: list[status.Outcome] = []

        # Credentials first: the database password and the TURN secret live there.
        creds: credentials.CredentialsResult | None = None
        try:
            creds = await credentials.ensure_secret(
                self.kube, namespace=namespace, owner=body, spec=spec, config=self.config
            )
            if creds.regenerated:
                event(
                    "Warning",
                    "SecretRegenerated",
                    f"Secret {creds.name}: replaced invalid "
                    + "; ".join(f"{k} ({why})" for k, why in creds.regenerated.items()),
                )
            if creds.created:
                event("Normal", "SecretCreated", f"created Secret {creds.name}")
            elif creds.adopted:
                event("Normal", "SecretAdopted", f"adopted retained Secret {creds.name}")
            elif creds.updated:
                event("Normal", "SecretUpdated", f"updated derived keys of Secret {creds.name}")
            outcomes.append(status.Outcome("Credentials", True, "SecretReady", creds.name))
        except credentials.SecretConflict as exc:
            outcomes.append(status.Outcome("Credentials", False, "SecretConflict", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            outcomes.append(self._failure("Credentials", "SecretFailed", exc))

        owner_ref = f"{namespace}/{meta['name']}"
        db_outcome = await self._database(spec, creds, uid, owner_ref, resources, event)
        outcomes.append(db_outcome)
        # The claim on the tenant id is the lock for every backend: an object
        # that does not hold it touches none of them (nor runs workloads).
        if self.backends.database is not None and uid not in self._claimed:
            if db_outcome.reason == "TenantIdConflict":
                reason, message = "TenantIdConflict", f"not provisioned: {db_outcome.message}"
            else:
                reason = "WaitingForDatabase"
                message = "waiting for the tenant id to be claimed in the database"
            for component in ("Topics", "Storage", "Turn", "Workloads"):
                outcomes.append(status.Outcome(component, False, reason, message))
            return outcomes, resources
        outcomes.append(await self._topics(spec, resources, event))
        outcomes.append(await self._storage(spec, resources, event))
        outcomes.append(await self._turn(spec, creds, resources, event))
        outcomes.append(await self._workloads(body, spec, creds, resources, event))
        return outcomes, resources

    def _failure(self, component: str, reason: str, exc: BaseException) -> status.Outcome:
        logger.warning("%s failed: %s", component, exc, exc_info=not _expected(exc))
        message = str(exc) or type(exc).__name__
        return status.Outcome(component, False, reason, message)

    async def _database(
        self,
        spec: spec_mod.TenantSpec,
        creds: credentials.CredentialsResult | None,
        uid: str,
        owner_ref: str,
        resources: dict[str, Any],
        event: EventFn,
    ) -> status.Outcome:
        db = self.backends.database
        if db is None:
            return _not_managed("Database", "IMHUB_OPERATOR_DATABASE_URL")
        if creds is None:
            return status.Outcome(
                "Database", False, "WaitingForCredentials", "the credentials Secret is not ready"
            )
        try:
            result = await db.ensure(
                spec.names,
                password=creds.data["database-password"],
                owner_uid=uid,
                owner_ref=owner_ref,
                alive=self._alive,
            )
        except database.DatabaseUnavailable as exc:
            return self._failure("Database", "DatabaseUnavailable", exc)
        except database.DatabaseConflict as exc:
            self._claimed.discard(uid)
            return self._failure("Database", "TenantIdConflict", exc)
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            return self._failure("Database", "DatabaseFailed", exc)
        self._claimed.add(uid)
        resources["databaseSchema"], resources["databaseRole"] = result.schema, result.role
        if result.migrated:
            event(
                "Normal",
                "SchemaMigrated",
                f"schema {result.schema} migrated to {result.revision}, role {result.role}",
            )
        return status.Outcome(
            "Database",
            True,
            "SchemaReady",
            f"schema {result.schema} at revision {result.revision}, role {result.role}",
        )

    async def _topics(
        self, spec: spec_mod.TenantSpec, resources: dict[str, Any], event: EventFn
    ) -> status.Outcome:
        admin = self.backends.topics
        if admin is None:
            return _not_managed("Topics", "IMHUB_OPERATOR_KAFKA_BOOTSTRAP")
        try:
            result = await admin.ensure(
                spec.names.topics,
                partitions=spec.kafka.partitions,
                retention_ms=spec.kafka.retention_ms,
                replication_factor=spec.kafka.replication_factor,
            )
        except topics.TopicsUnavailable as exc:
            return self._failure("Topics", "KafkaUnavailable", exc)
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            return self._failure("Topics", "TopicsFailed", exc)
        resources["topics"] = list(result.topics)
        resources["topicPartitions"] = min(result.partitions.values(), default=0)
        if result.created:
            event("Normal", "TopicsCreated", f"created {', '.join(result.created)}")
        if result.grown:
            event(
                "Normal",
                "PartitionsIncreased",
                f"{', '.join(result.grown)} now have {spec.kafka.partitions} partitions",
            )
        if result.reconfigured:
            event("Normal", "RetentionUpdated", f"retention.ms={spec.kafka.retention_ms}")
        return status.Outcome("Topics", True, "TopicsReady", result.summary())

    async def _storage(
        self, spec: spec_mod.TenantSpec, resources: dict[str, Any], event: EventFn
    ) -> status.Outcome:
        s3 = self.backends.storage
        if s3 is None:
            return _not_managed("Storage", "IMHUB_OPERATOR_S3_ENDPOINT")
        try:
            result = await s3.ensure(
                spec.names.bucket, cors_origins=spec.storage.cors_allowed_origins
            )
        except storage.StorageUnavailable as exc:
            return self._failure("Storage", "StorageUnavailable", exc)
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            return self._failure("Storage", "StorageFailed", exc)
        resources["bucket"] = result.bucket
        if result.created or result.policy_updated or result.cors_updated:
            event("Normal", "BucketProvisioned", result.summary())
        return status.Outcome("Storage", True, "BucketReady", result.summary())

    async def _turn(
        self,
        spec: spec_mod.TenantSpec,
        creds: credentials.CredentialsResult | None,
        resources: dict[str, Any],
        event: EventFn,
    ) -> status.Outcome:
        if not spec.turn.enabled:
            if self.backends.turn is not None and creds is not None:
                try:
                    if await self.backends.turn.remove(creds.data["turn-secret"]):
                        event("Normal", "TurnSecretRevoked", "TURN disabled in the spec")
                except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
                    return self._failure("Turn", "TurnUnavailable", exc)
            return status.Outcome("Turn", True, "Disabled", "spec.turn.enabled is false")
        coturn = self.backends.turn
        if coturn is None:
            return _not_managed("Turn", "IMHUB_OPERATOR_TURN_DB")
        if creds is None:
            return status.Outcome(
                "Turn", False, "WaitingForCredentials", "the credentials Secret is not ready"
            )
        try:
            stale = creds.replaced.get("turn-secret")
            if stale:
                await coturn.remove(stale)
            added = await coturn.ensure(creds.data["turn-secret"])
        except turn.TurnUnavailable as exc:
            return self._failure("Turn", "TurnUnavailable", exc)
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            return self._failure("Turn", "TurnFailed", exc)
        resources["turnRealm"] = coturn.realm
        if added:
            event("Normal", "TurnSecretAdded", f"secret added to coturn realm {coturn.realm}")
        return status.Outcome("Turn", True, "SecretInstalled", f"realm {coturn.realm}")

    async def _workloads(
        self,
        body: Mapping[str, Any],
        spec: spec_mod.TenantSpec,
        creds: credentials.CredentialsResult | None,
        resources: dict[str, Any],
        event: EventFn,
    ) -> status.Outcome:
        if creds is None:
            return status.Outcome(
                "Workloads", False, "WaitingForCredentials", "the credentials Secret is not ready"
            )
        try:
            result = await workloads.apply_workloads(
                self.kube,
                spec,
                self.config,
                namespace=body["metadata"]["namespace"],
                owner=body,
                data=creds.data,
            )
        except Exception as exc:  # noqa: BLE001 - a failing step becomes its condition
            return self._failure("Workloads", "WorkloadsFailed", exc)
        resources["service"] = result.service
        resources["deployments"] = list(result.deployments)
        if result.created or result.updated:
            event("Normal", "WorkloadsApplied", result.summary())
        return status.Outcome("Workloads", True, "WorkloadsApplied", result.summary())

    # -- deletion -----------------------------------------------------------------

    async def cleanup(self, body: Mapping[str, Any], event: EventFn) -> CleanupReport:
        """Undo the tenant as ``spec.deletionPolicy`` says; every step is attempted.

        Backends are touched only when this object holds the claim on its
        tenant id: a refused duplicate removes its own objects and nothing else.
        """
        meta = body["metadata"]
        namespace, uid = meta["namespace"], meta["uid"]
        owner_ref = f"{namespace}/{meta['name']}"
        report = CleanupReport()
        try:
            spec = spec_mod.parse_spec(body.get("spec") or {})
        except spec_mod.InvalidSpec as exc:
            report.errors.append(f"spec unreadable, nothing to clean up: {exc}")
            return report
        names = spec.names
        delete_data = spec.deletion_policy == "Delete"

        async def step(done: str, todo: str, action: Callable[[], Awaitable[Any]]) -> None:
            """``done``: what happened; ``todo``: what is left undone if it fails."""
            try:
                outcome = await action()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on past any failure
                logger.warning("cleanup step %r failed: %s", todo, exc)
                report.errors.append(f"{todo} ({exc})")
                event("Warning", "CleanupFailed", f"could not {todo}: {exc}")
            else:
                if outcome is not False:
                    report.done.append(done)

        async with self.lock(uid):
            # Workloads go first, whatever the policy: no pod keeps serving a
            # deleted tenant (owner references alone need a garbage collector).
            await step(
                "workloads deleted",
                "delete workloads",
                lambda: workloads.delete_workloads(
                    self.kube, spec, namespace=namespace, owner_uid=uid
                ),
            )
            db, admin, s3 = self.backends.database, self.backends.topics, self.backends.storage
            holder: bool | None = True  # no database: no claim to check
            if db is not None and uid not in self._claimed:
                try:
                    holder = await db.owns(names, uid)
                except Exception as exc:  # noqa: BLE001 - cleanup goes on past any failure
                    holder = None
                    report.errors.append(
                        f"clean up the backends of tenant {spec.tenant_id}: cannot tell whether "
                        f"this ImTenant holds it ({exc})"
                    )
            if holder is None:
                return report  # retried; in the end the finalizer goes, the data stays
            if not holder:
                report.done.append(
                    f"backends of tenant {spec.tenant_id} left alone (claimed by another "
                    "ImTenant, or never claimed)"
                )
                await step(
                    f"Secret {names.k8s_secret} deleted",
                    f"delete Secret {names.k8s_secret}",
                    lambda: credentials.delete_own_secret(self.kube, namespace, spec, uid),
                )
                return report

            secret_data: dict[str, str] | None = None
            try:
                secret_data = await credentials.read_secret(self.kube, namespace, spec)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on past any failure
                report.errors.append(f"read Secret {names.k8s_secret} ({exc})")
            coturn = self.backends.turn
            if coturn is not None and secret_data and secret_data.get("turn-secret"):
                turn_secret = secret_data["turn-secret"]
                await step(
                    "turn secret revoked",
                    "revoke the TURN secret",
                    lambda: coturn.remove(turn_secret),
                )

            if delete_data:
                if db is not None:
                    await step(
                        f"schema {names.db_schema} dropped",
                        f"drop schema {names.db_schema} and role {names.db_role}",
                        lambda: db.drop(names, uid),
                    )
                if admin is not None:
                    await step(
                        "topics deleted",
                        f"delete topics {', '.join(names.topics)}",
                        lambda: admin.delete(names.topics),
                    )
                if s3 is not None:
                    await step(
                        f"bucket {names.bucket} deleted",
                        f"delete bucket {names.bucket}",
                        lambda: s3.delete(names.bucket),
                    )
                await step(
                    f"Secret {names.k8s_secret} deleted",
                    f"delete Secret {names.k8s_secret}",
                    lambda: credentials.delete_own_secret(self.kube, namespace, spec, uid),
                )
            else:
                if db is not None:
                    await step(
                        f"role {names.db_role} disabled",
                        f"disable role {names.db_role} and mark schema {names.db_schema} "
                        f"retained for {owner_ref}",
                        lambda: db.retain(names, uid, owner_ref),
                    )
                await step(
                    f"Secret {names.k8s_secret} retained",
                    f"retain Secret {names.k8s_secret}",
                    lambda: credentials.orphan_secret(
                        self.kube, namespace=namespace, spec=spec, owner_name=meta["name"]
                    ),
                )
        return report


def _expected(exc: BaseException) -> bool:
    """Backend outages are reported without a traceback; anything else gets one."""
    return isinstance(
        exc,
        database.DatabaseUnavailable
        | topics.TopicsUnavailable
        | storage.StorageUnavailable
        | turn.TurnUnavailable
        | kube_mod.ApiError,
    )
