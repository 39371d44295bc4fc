"""What the operator renders for a tenant, checked against the real runtime code.

The Deployments' args go through ``imhub.cli.build_parser()`` and their
environment through the runtime's ``Settings`` and tenant loader, so a renamed
flag or setting breaks here rather than in a pod that never becomes ready.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import yaml

from imhub import cli
from imhub.operator import config as config_mod
from imhub.operator import render, spec, workloads
from imhub.runtime import settings, tenants
from tests.realservices import REPO

OWNER = {"metadata": {"name": "acme", "namespace": "team-a", "uid": "u-1234"}}


def _config(**overrides: Any) -> config_mod.OperatorConfig:
    values: dict[str, Any] = {
        "database_url": "postgresql://admin:pw@db.example:5432/imhub",
        "kafka_bootstrap": "kafka.example:9092",
        "redis_url": "redis://redis.example:6379/0",
        "s3_endpoint": "http://s3.example:7070",
        "s3_access_key": "AK",
        "s3_secret_key": "SK",
        "turn_db": "/var/lib/turn/turndb",
        "turn_urls": ["turn:turn.example:3478"],
        "image": "registry.example/imhub:1.2.3",
    }
    values.update(overrides)
    return config_mod.OperatorConfig(**values)


def _spec(**overrides: Any) -> spec.TenantSpec:
    return spec.parse_spec({"tenantId": "acme", **overrides})


def _objects(
    tenant: spec.TenantSpec | None = None, config: config_mod.OperatorConfig | None = None
) -> list[dict[str, Any]]:
    tenant = tenant or _spec()
    config = config or _config()
    data = render.secret_data(tenant, config, None)
    return workloads.render_all(tenant, config, namespace="team-a", owner=OWNER, data=data)


def _deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objects
        if o["kind"] == "Deployment"
    }


# -- the Secret -------------------------------------------------------------------


def test_generated_values_are_made_once_and_kept() -> None:
    tenant, config = _spec(), _config()
    first = render.secret_data(tenant, config, None)
    again = render.secret_data(tenant, config, first)
    assert {k: again[k] for k in render.GENERATED_KEYS} == {
        k: first[k] for k in render.GENERATED_KEYS
    }
    other = render.secret_data(tenant, config, None)
    assert all(other[k] != first[k] for k in render.GENERATED_KEYS)
    assert all(len(first[k]) >= 32 for k in render.GENERATED_KEYS)


def test_missing_generated_key_is_filled_others_kept() -> None:
    tenant, config = _spec(), _config()
    first = render.secret_data(tenant, config, None)
    partial = {k: v for k, v in first.items() if k != "api-key"}
    again = render.secret_data(tenant, config, partial)
    assert again["jwt-secret"] == first["jwt-secret"]
    assert again["api-key"] and again["api-key"] != first["api-key"]


def test_invalid_generated_values_are_regenerated() -> None:
    tenant, config = _spec(), _config()
    first = render.secret_data(tenant, config, None)
    edited = {**first, "jwt-secret": "short", "api-key": "x" * 15}
    again = render.secret_data(tenant, config, edited)
    assert len(again["jwt-secret"]) >= 32 and again["api-key"] != "x" * 15
    assert again["turn-secret"] == first["turn-secret"]
    assert again["jwt-secret"] in again["tenants.yaml"]
    assert render.invalid_generated("jwt-secret", "short")
    assert render.invalid_generated("jwt-secret", "y" * 32) is None


def test_database_url_uses_the_tenant_role() -> None:
    data = render.secret_data(_spec(), _config(), None)
    password = data["database-password"]
    assert data["database-url"] == (
        f"postgresql+asyncpg://imhub_t_acme:{password}@db.example:5432/imhub"
    )
    moved = render.secret_data(_spec(), _config(database_host_for_tenants="pg.db.svc:5432"), data)
    assert "@pg.db.svc:5432/imhub" in moved["database-url"]


def test_tenant_document_loads_in_the_runtime_with_spec_limits() -> None:
    tenant = _spec(
        limits={"maxContentBytes": 4096, "ratePerSecond": 5, "rateBurst": 7},
        storage={"maxUploadBytes": 2048, "allowedContentTypes": ["image/*"]},
        webhookUrl="https://backend.acme.example/push",
    )
    data = render.secret_data(tenant, _config(), None)
    registry = tenants.load_tenants(environ={"IMHUB_TENANTS": data["tenants.yaml"]})
    loaded = registry.get("acme")
    assert loaded is not None and registry.ids() == ["acme"]
    assert loaded.signing_secret().secret == data["jwt-secret"]
    assert loaded.api_key_matches(data["api-key"])
    assert loaded.turn_secret == data["turn-secret"]
    assert loaded.webhook_url == "https://backend.acme.example/push"
    assert loaded.limits.max_content_bytes == 4096
    assert loaded.limits.rate_per_second == 5 and loaded.limits.rate_burst == 7
    assert loaded.limits.max_upload_bytes == 2048
    assert loaded.limits.allowed_content_types == ("image/*",)


def test_turn_disabled_leaves_the_runtime_without_turn() -> None:
    tenant = _spec(turn={"enabled": False})
    data = render.secret_data(tenant, _config(), None)
    loaded = tenants.load_tenants(environ={"IMHUB_TENANTS": data["tenants.yaml"]}).get("acme")
    assert loaded is not None and loaded.turn_secret is None
    env = {
        e["name"]: e
        for e in _deployments(_objects(tenant))["gateway"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert json.loads(env["IMHUB_TURN_URLS"]["value"]) == []


def test_secret_object() -> None:
    tenant = _spec()
    body = render.secret(tenant, "team-a", OWNER, {"k": "v"})
    assert body["metadata"]["name"] == "imhub-acme-credentials"
    assert body["metadata"]["ownerReferences"][0]["uid"] == "u-1234"
    assert body["stringData"] == {"k": "v"}


# -- workloads --------------------------------------------------------------------


def test_one_service_and_three_deployments_owned_by_the_tenant() -> None:
    objects = _objects()
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Service", "imhub-acme-gateway"),
        ("Deployment", "imhub-acme-gateway"),
        ("Deployment", "imhub-acme-message"),
        ("Deployment", "imhub-acme-rtc"),
    ]
    for obj in objects:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "imhub.io/v1alpha1",
            "kind": "ImTenant",
            "name": "acme",
            "uid": "u-1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["labels"]["imhub.io/tenant"] == "acme"
        assert workloads.HASH_ANNOTATION in obj["metadata"]["annotations"]


@pytest.mark.parametrize("component", ["gateway", "message-service", "rtc-service"])
def test_container_args_are_real_imhub_commands(component: str) -> None:
    deployment = _deployments(_objects())[component]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == component
    assert args.host == "0.0.0.0" and args.port == 8080
    # The parsed command is the role runner of that component.
    assert args.func.__qualname__ == cli._cmd_role(component).__qualname__


def test_dockerfile_entrypoint_is_imhub() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["imhub"\]$', text, re.M)
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))


def test_environment_is_what_the_runtime_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = _spec(kafka={"partitions": 12}, turn={"ttlSeconds": 600})
    config = _config()
    data = render.secret_data(tenant, config, None)
    deployment = _deployments(_objects(tenant, config))["gateway"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]

    # Resolve what a kubelet would: secretKeyRef from the Secret, fieldRef from the pod.
    resolved: dict[str, str] = {}
    for var in env:
        assert var["name"].startswith("IMHUB_"), var["name"]
        if "value" in var:
            resolved[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "imhub-acme-credentials"
            resolved[var["name"]] = data[ref["key"]]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            resolved[var["name"]] = "imhub-acme-gateway-abc12"

    known = set(settings.Settings.model_fields)
    for name in resolved:
        key = name.removeprefix("IMHUB_").lower()
        assert key in known or key == "tenants", f"{name} is not a runtime setting"

    for name in list(os.environ):
        if name.startswith("IMHUB_"):
            monkeypatch.delenv(name)
    for name, value in resolved.items():
        monkeypatch.setenv(name, value)
    loaded = settings.Settings()
    assert loaded.database_url == data["database-url"]
    assert loaded.kafka_bootstrap == "kafka.example:9092"
    assert loaded.redis_url == "redis://redis.example:6379/0"
    assert loaded.s3_endpoint == "http://s3.example:7070"
    assert (loaded.s3_access_key, loaded.s3_secret_key) == ("AK", "SK")
    assert loaded.turn_urls == ["turn:turn.example:3478"]
    assert loaded.turn_ttl_seconds == 600
    assert loaded.bus_partitions == 12
    assert loaded.instance_id == "imhub-acme-gateway-abc12"
    assert not loaded.embedded
    assert tenants.load_tenants(environ=resolved).ids() == ["acme"]


def test_no_secret_values_in_plain_env() -> None:
    config = _config()
    data = render.secret_data(_spec(), config, None)
    for deployment in _deployments(_objects(_spec(), config)).values():
        plain = json.dumps(
            [e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]]
        )
        for key in (*render.GENERATED_KEYS, "database-url", "s3-secret-key", "redis-url"):
            assert data[key] not in plain, key


def test_spec_drives_image_replicas_and_resources() -> None:
    tenant = _spec(
        runtime={
            "image": "example/imhub:custom",
            "replicas": {"gateway": 4, "messageService": 2, "rtcService": 0},
            "resources": {"gateway": {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}},
        }
    )
    deployments = _deployments(_objects(tenant))
    assert {c: d["spec"]["replicas"] for c, d in deployments.items()} == {
        "gateway": 4,
        "message-service": 2,
        "rtc-service": 0,
    }
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == "example/imhub:custom"
    assert gateway["resources"] == {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}
    default = _deployments(_objects())["message-service"]["spec"]["template"]["spec"]
    assert default["containers"][0]["image"] == "registry.example/imhub:1.2.3"
    assert default["securityContext"]["runAsNonRoot"] is True


def test_service_selects_gateway_pods_only() -> None:
    objects = _objects()
    service = objects[0]
    deployments = _deployments(objects)
    pod_labels = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for other in ("message-service", "rtc-service"):
        labels = deployments[other]["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= labels.items()
    for deployment in deployments.values():
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


def test_changed_secret_rolls_the_pods() -> None:
    tenant, config = _spec(), _config()
    data = render.secret_data(tenant, config, None)
    before = render.deployment(tenant, config, "gateway", namespace="n", owner=OWNER, data=data)
    changed = {**data, "redis-url": "redis://elsewhere:6379/0"}
    after = render.deployment(tenant, config, "gateway", namespace="n", owner=OWNER, data=changed)
    key = "imhub.io/config-hash"
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != after["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_endpoints_are_service_dns() -> None:
    got = render.endpoints(_spec(), _config(), "team-a")
    assert got == {
        "gateway": "http://imhub-acme-gateway.team-a.svc.cluster.local:8080",
        "websocket": "ws://imhub-acme-gateway.team-a.svc.cluster.local:8080/v1/im/ws",
    }


def test_unmanaged_backends_leave_their_settings_out() -> None:
    config = config_mod.OperatorConfig(image="x/imhub:1")
    data = render.secret_data(_spec(), config, None)
    assert "database-url" not in data and "redis-url" not in data
    env = _deployments(_objects(_spec(), config))["gateway"]["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    names = {e["name"] for e in env}
    assert not names & {"IMHUB_DATABASE_URL", "IMHUB_KAFKA_BOOTSTRAP", "IMHUB_S3_ENDPOINT"}


def test_tenants_yaml_is_plain_yaml() -> None:
    data = render.secret_data(_spec(), _config(), None)
    doc = yaml.safe_load(data["tenants.yaml"])
    assert [t["tenant_id"] for t in doc["tenants"]] == ["acme"]
