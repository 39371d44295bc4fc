"""Rendering of the Kubernetes objects a tenant gets: pure functions, no I/O.

The credentials Secret, the gateway Service and the three Deployments are
built here from the spec and the operator configuration, so tests can check
them (and feed the rendered container args to the real ``imhub`` parser)
without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from imhub.operator import config as config_mod
from imhub.operator import spec as spec_mod

__all__ = [
    "COMPONENT_ROLES",
    "GENERATED_KEYS",
    "component_names",
    "database_url_for_tenant",
    "deployment",
    "endpoints",
    "gateway_service",
    "labels",
    "owner_reference",
    "secret",
    "secret_data",
    "tenant_document",
]

MANAGED_BY = "imhub-operator"
# Secret keys generated once and never regenerated; everything else in the
# Secret is derived from them, the spec and the operator configuration.
GENERATED_KEYS = ("jwt-secret", "api-key", "turn-secret", "database-password")
# component (label value) -> imhub subcommand
COMPONENT_ROLES = {
    "gateway": "gateway",
    "message-service": "message-service",
    "rtc-service": "rtc-service",
}
HTTP_PORT_NAME = "http"


def component_names(spec: spec_mod.TenantSpec) -> dict[str, str]:
    names = spec.names
    return {
        "gateway": names.k8s_gateway,
        "message-service": names.k8s_message_service,
        "rtc-service": names.k8s_rtc_service,
    }


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller reference to the ``ImTenant`` (``owner`` is its body)."""
    return {
        "apiVersion": f"{spec_mod.GROUP}/{spec_mod.VERSION}",
        "kind": spec_mod.KIND,
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(spec: spec_mod.TenantSpec, component: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "imhub",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/instance": spec.names.k8s_base,
        "imhub.io/tenant": spec.tenant_id,
    }
    if component is not None:
        out["app.kubernetes.io/component"] = component
    return out


def _selector(spec: spec_mod.TenantSpec, component: str) -> dict[str, str]:
    return {"imhub.io/tenant": spec.tenant_id, "app.kubernetes.io/component": component}


def _metadata(
    name: str, namespace: str, spec: spec_mod.TenantSpec, owner: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": labels(spec, extra.pop("component", None)),
        "ownerReferences": [owner_reference(owner)],
    }
    meta.update(extra)
    return meta


# -- credentials ------------------------------------------------------------------


def new_secret_value() -> str:
    return secrets.token_urlsafe(32)


# Shortest acceptable generated values (the runtime's rules in runtime/tenants.py:
# HS256 secret 32+, API key 16+; the TURN secret and password as strong as the API key).
GENERATED_MIN_LENGTH = {
    "jwt-secret": 32,
    "api-key": 16,
    "turn-secret": 16,
    "database-password": 16,
}


def invalid_generated(key: str, value: str | None) -> str | None:
    """Why ``value`` is no good for the generated ``key`` (``None``: it is fine)."""
    if not value:
        return "empty"
    minimum = GENERATED_MIN_LENGTH.get(key, 1)
    if len(value) < minimum:
        return f"shorter than {minimum} characters"
    if not value.isprintable() or value != value.strip():
        return "contains whitespace or control characters"
    return None


def database_url_for_tenant(
    admin_url: str, role: str, password: str, host_override: str | None = None
) -> str:
    """The tenant's DSN: the admin DSN's host, port and database, the tenant's role."""
    parts = urlsplit(admin_url)
    host = host_override or parts.netloc.rsplit("@", 1)[-1]
    database = parts.path.lstrip("/") or "postgres"
    query = f"?{parts.query}" if parts.query else ""
    return (
        f"postgresql+asyncpg://{quote(role, safe='')}:{quote(password, safe='')}"
        f"@{host}/{database}{query}"
    )


def tenant_document(spec: spec_mod.TenantSpec, generated: Mapping[str, str]) -> dict[str, Any]:
    """The runtime's tenants document (``IMHUB_TENANTS``) for this one tenant."""
    doc: dict[str, Any] = {
        "tenant_id": spec.tenant_id,
        "keys": [{"kid": "k1", "alg": "HS256", "secret": generated["jwt-secret"]}],
        "api_key": generated["api-key"],
        "limits": {
            "max_content_bytes": spec.limits.max_content_bytes,
            "max_upload_bytes": spec.storage.max_upload_bytes,
            "allowed_content_types": list(spec.storage.allowed_content_types),
            "rate_per_second": spec.limits.rate_per_second,
            "rate_burst": spec.limits.rate_burst,
            "max_group_members": spec.limits.max_group_members,
            "max_connections_per_user": spec.limits.max_connections_per_user,
        },
    }
    if spec.turn.enabled:
        doc["turn_secret"] = generated["turn-secret"]
    if spec.webhook_url:
        doc["webhook_url"] = spec.webhook_url
    return {"tenants": [doc]}


def secret_data(
    spec: spec_mod.TenantSpec,
    config: config_mod.OperatorConfig,
    existing: Mapping[str, str] | None,
) -> dict[str, str]:
    """All Secret keys (plain text): generated ones kept from ``existing``."""
    existing = existing or {}
    generated = {
        key: value
        if (value := existing.get(key)) and invalid_generated(key, value) is None
        else new_secret_value()
        for key in GENERATED_KEYS
    }
    data = dict(generated)
    data["tenant-id"] = spec.tenant_id
    data["jwt-kid"] = "k1"
    data["database-role"] = spec.names.db_role
    data["database-schema"] = spec.names.db_schema
    if config.database_url:
        data["database-url"] = database_url_for_tenant(
            config.database_url,
            spec.names.db_role,
            generated["database-password"],
            config.database_host_for_tenants,
        )
    if config.redis_url:
        data["redis-url"] = config.redis_url
    if config.s3_access_key:
        data["s3-access-key"] = config.s3_access_key
    if config.s3_secret_key:
        data["s3-secret-key"] = config.s3_secret_key
    data["tenants.yaml"] = yaml.safe_dump(tenant_document(spec, generated), sort_keys=False)
    return data


def secret(
    spec: spec_mod.TenantSpec,
    namespace: str,
    owner: Mapping[str, Any],
    data: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(spec.names.k8s_secret, namespace, spec, owner),
        "stringData": dict(data),
    }


# -- workloads --------------------------------------------------------------------


def _secret_env(name: str, secret_name: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret_name, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _env(
    spec: spec_mod.TenantSpec, config: config_mod.OperatorConfig, data: Mapping[str, str]
) -> list[dict[str, Any]]:
    secret_name = spec.names.k8s_secret
    env: list[dict[str, Any]] = [
        {"name": "IMHUB_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IMHUB_LOG_FORMAT", "value": "json"},
        {"name": "IMHUB_DATA_DIR", "value": "/tmp/imhub"},
        _secret_env("IMHUB_TENANTS", secret_name, "tenants.yaml"),
        {"name": "IMHUB_BUS_PARTITIONS", "value": str(spec.kafka.partitions)},
        {"name": "IMHUB_TURN_TTL_SECONDS", "value": str(spec.turn.ttl_seconds)},
    ]
    if "database-url" in data:
        env.append(_secret_env("IMHUB_DATABASE_URL", secret_name, "database-url"))
    if "redis-url" in data:
        env.append(_secret_env("IMHUB_REDIS_URL", secret_name, "redis-url"))
    bootstrap = config.tenant_kafka_bootstrap()
    if bootstrap:
        env.append({"name": "IMHUB_KAFKA_BOOTSTRAP", "value": bootstrap})
    s3_endpoint = config.tenant_s3_endpoint()
    if s3_endpoint:
        env.append({"name": "IMHUB_S3_ENDPOINT", "value": s3_endpoint})
        env.append({"name": "IMHUB_S3_REGION", "value": config.s3_region})
        if config.s3_public_endpoint:
            env.append({"name": "IMHUB_S3_PUBLIC_ENDPOINT", "value": config.s3_public_endpoint})
        if "s3-access-key" in data:
            env.append(_secret_env("IMHUB_S3_ACCESS_KEY", secret_name, "s3-access-key"))
        if "s3-secret-key" in data:
            env.append(_secret_env("IMHUB_S3_SECRET_KEY", secret_name, "s3-secret-key"))
    turn_urls = config.turn_urls if spec.turn.enabled else []
    env.append({"name": "IMHUB_TURN_URLS", "value": json.dumps(turn_urls)})
    if config.stun_urls is not None:
        env.append({"name": "IMHUB_STUN_URLS", "value": json.dumps(config.stun_urls)})
    return env


def container_args(component: str, port: int) -> list[str]:
    """``imhub`` arguments for one component (the image's entrypoint is ``imhub``)."""
    return [COMPONENT_ROLES[component], "--host", "0.0.0.0", "--port", str(port)]


def config_hash(data: Mapping[str, str]) -> str:
    """Changes when the Secret changes, so pods restart with the new values."""
    blob = json.dumps(dict(sorted(data.items())), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def deployment(
    spec: spec_mod.TenantSpec,
    config: config_mod.OperatorConfig,
    component: str,
    *,
    namespace: str,
    owner: Mapping[str, Any],
    data: Mapping[str, str],
) -> dict[str, Any]:
    name = component_names(spec)[component]
    replicas = {
        "gateway": spec.runtime.replicas.gateway,
        "message-service": spec.runtime.replicas.message_service,
        "rtc-service": spec.runtime.replicas.rtc_service,
    }[component]
    resources = {
        "gateway": spec.runtime.resources.gateway,
        "message-service": spec.runtime.resources.message_service,
        "rtc-service": spec.runtime.resources.rtc_service,
    }[component]
    port = config.gateway_port
    container: dict[str, Any] = {
        "name": component,
        "image": spec.runtime.image or config.image,
        "imagePullPolicy": spec.runtime.image_pull_policy or config.image_pull_policy,
        "args": container_args(component, port),
        "env": _env(spec, config, data),
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": HTTP_PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": HTTP_PORT_NAME},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if resources:
        container["resources"] = {k: dict(v) for k, v in resources.items()}
    pod_labels = {**labels(spec, component), **_selector(spec, component)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, spec, owner, component=component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(spec, component)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"imhub.io/config-hash": config_hash(data)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def gateway_service(
    spec: spec_mod.TenantSpec,
    config: config_mod.OperatorConfig,
    *,
    namespace: str,
    owner: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec.names.k8s_gateway, namespace, spec, owner, component="gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(spec, "gateway"),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": config.gateway_port,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def endpoints(
    spec: spec_mod.TenantSpec, config: config_mod.OperatorConfig, namespace: str
) -> dict[str, str]:
    host = f"{spec.names.k8s_gateway}.{namespace}.svc.{config.cluster_domain}"
    base = f"{host}:{config.gateway_port}"
    return {"gateway": f"http://{base}", "websocket": f"ws://{base}/v1/im/ws"}
