"""Applying the tenant's gateway Service and its three Deployments.

Each object carries ``imhub.io/render-hash``, the hash of what the operator
rendered. An object is replaced when that hash differs or when a field people
edit by hand (replicas, image, args) no longer matches, so the drift timer
undoes manual changes without rewriting objects that are already right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from imhub.operator import config as config_mod
from imhub.operator import kube as kube_mod
from imhub.operator import render
from imhub.operator import spec as spec_mod

__all__ = ["WorkloadsResult", "apply_workloads", "delete_workloads", "render_all"]

HASH_ANNOTATION = "imhub.io/render-hash"
# Fields the API server allocates on a Service and that a PUT must carry over.
_SERVICE_KEEP = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy")


@dataclasses.dataclass(slots=True)
class WorkloadsResult:
    service: str
    deployments: list[str]
    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    available: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        if self.created:
            parts.append(f"created {', '.join(self.created)}")
        if self.updated:
            parts.append(f"updated {', '.join(self.updated)}")
        if not parts:
            parts.append("up to date")
        if self.available:
            pods = ", ".join(f"{k} {v}" for k, v in self.available.items())
            parts.append(f"pods available: {pods}")
        return "; ".join(parts)


def _hash(obj: Mapping[str, Any]) -> str:
    blob = json.dumps(
        {"spec": obj.get("spec"), "labels": obj["metadata"].get("labels")}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_all(
    spec: spec_mod.TenantSpec,
    config: config_mod.OperatorConfig,
    *,
    namespace: str,
    owner: Mapping[str, Any],
    data: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Service first, then the Deployments; each stamped with its render hash."""
    objects = [render.gateway_service(spec, config, namespace=namespace, owner=owner)]
    for component in render.COMPONENT_ROLES:
        objects.append(
            render.deployment(spec, config, component, namespace=namespace, owner=owner, data=data)
        )
    for obj in objects:
        obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = _hash(obj)
    return objects


def _container(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    first: Mapping[str, Any] = containers[0]
    return first


def _drifted(live: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if (live["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) != want["metadata"][
        "annotations"
    ][HASH_ANNOTATION]:
        return True
    owners = {r.get("uid") for r in live["metadata"].get("ownerReferences") or []}
    if want["metadata"]["ownerReferences"][0]["uid"] not in owners:
        return True
    if want["kind"] == "Deployment":
        if live["spec"].get("replicas") != want["spec"]["replicas"]:
            return True
        live_c, want_c = _container(live), _container(want)
        return any(live_c.get(k) != want_c.get(k) for k in ("image", "args"))
    live_ports = [(p.get("port"), p.get("targetPort")) for p in live["spec"].get("ports") or []]
    want_ports = [(p["port"], p["targetPort"]) for p in want["spec"]["ports"]]
    return live_ports != want_ports or live["spec"].get("selector") != want["spec"]["selector"]


async def apply_workloads(
    kube: kube_mod.Kube,
    spec: spec_mod.TenantSpec,
    config: config_mod.OperatorConfig,
    *,
    namespace: str,
    owner: Mapping[str, Any],
    data: Mapping[str, str],
) -> WorkloadsResult:
    objects = render_all(spec, config, namespace=namespace, owner=owner, data=data)
    result = WorkloadsResult(
        service=spec.names.k8s_gateway,
        deployments=[o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"],
    )
    for want in objects:
        name = want["metadata"]["name"]
        live = await kube.get(want["kind"], namespace, name)
        if live is None:
            await kube.create(namespace, want)
            result.created.append(f"{want['kind']}/{name}")
            continue
        if want["kind"] == "Deployment":
            status = live.get("status") or {}
            result.available[name] = (
                f"{status.get('availableReplicas', 0)}/{want['spec']['replicas']}"
            )
        if not _drifted(live, want):
            continue
        body = json.loads(json.dumps(want))
        body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if want["kind"] == "Service":
            for key in _SERVICE_KEEP:
                if key in live["spec"]:
                    body["spec"][key] = live["spec"][key]
        await kube.replace(namespace, body)
        result.updated.append(f"{want['kind']}/{name}")
    return result


async def delete_workloads(
    kube: kube_mod.Kube, spec: spec_mod.TenantSpec, *, namespace: str, owner_uid: str
) -> list[str]:
    """Delete the Deployments and the Service owned by ``owner_uid``; returns what went."""
    gone = []
    for component, name in render.component_names(spec).items():
        kinds = ("Deployment", "Service") if component == "gateway" else ("Deployment",)
        for kind in kinds:
            live = await kube.get(kind, namespace, name)
            if live is None or not _owned_by(live, owner_uid):
                continue  # gone, or another object's (same tenantId, same namespace)
            if await kube.delete(kind, namespace, name):
                gone.append(f"{kind}/{name}")
    return gone


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)
