"""The Helm chart, rendered and linted by the helm that scripts/cluster builds."""

from __future__ import annotations

from typing import Any

import pytest

from imhub import cli
from imhub.operator import config as config_mod
from tests.operator.conftest import Cluster, find, manifests
from tests.realservices import REPO

# The cluster fixture may build kube-apiserver and helm first (minutes, once).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

CHART = str(REPO / "charts" / "imhub-operator")


def _render(cluster: Cluster, *sets: str) -> list[dict[str, Any]]:
    args = ["template", "imhub", CHART, "--namespace", "imhub-system"]
    for item in sets:
        args += ["--set", item]
    return manifests(cluster.helm(*args).stdout)


def test_lint(cluster: Cluster) -> None:
    out = cluster.helm("lint", "--strict", CHART).stdout
    assert "0 chart(s) failed" in out


def test_default_render(cluster: Cluster) -> None:
    docs = _render(cluster)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "ServiceAccount",
    ]
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/imhub/imhub:0.1.0"
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "operator" and args.namespace is None
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_operator_env_is_operator_config(cluster: Cluster) -> None:
    docs = _render(
        cluster,
        "backends.database.existingSecret=pg-admin",
        "backends.kafka.bootstrap=kafka:9092",
        "backends.redis.existingSecret=redis",
        "backends.s3.endpoint=http://s3:7070",
        "backends.s3.existingSecret=s3-keys",
        "backends.turn.db=/turn/turndb",
        "backends.turn.urls={turn:turn.example:3478}",
    )
    env = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    fields = set(config_mod.OperatorConfig.model_fields)
    for var in env:
        key = var["name"].removeprefix("IMHUB_OPERATOR_").lower()
        assert var["name"].startswith("IMHUB_OPERATOR_") and key in fields, var["name"]
    by_name = {v["name"]: v for v in env}
    assert by_name["IMHUB_OPERATOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "pg-admin",
        "key": "url",
    }
    assert by_name["IMHUB_OPERATOR_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-keys"
    assert by_name["IMHUB_OPERATOR_TURN_URLS"]["value"] == '["turn:turn.example:3478"]'
    # The values parse as the operator's settings.
    plain = {
        v["name"].removeprefix("IMHUB_OPERATOR_").lower(): v["value"] for v in env if "value" in v
    }
    parsed = config_mod.OperatorConfig.model_validate(
        {k: v for k, v in plain.items() if k != "turn_urls"}
        | {"turn_urls": ["turn:turn.example:3478"]}
    )
    assert parsed.kafka_bootstrap == "kafka:9092" and parsed.drift_interval == 60


def test_rbac_is_least_privilege(cluster: Cluster) -> None:
    docs = _render(cluster)
    tenants_role = find(docs, "ClusterRole", "-tenants")
    rules = tenants_role["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
    by_resource = {(tuple(r["apiGroups"]), r["resources"][0]): set(r["verbs"]) for r in rules}
    assert by_resource[(("imhub.io",), "imtenants/status")] == {"get", "patch"}
    assert by_resource[(("imhub.io",), "imtenants/finalizers")] == {"update"}
    # Secrets are read by name: no list or watch of every Secret in the cluster.
    assert not by_resource[(("",), "secrets")] & {"list", "watch"}
    assert by_resource[(("apps",), "deployments")] >= {"get", "create", "update", "delete"}
    discovery = find(docs, "ClusterRole", "-discovery")
    for rule in discovery["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_watch_namespaces_bind_per_namespace(cluster: Cluster) -> None:
    docs = _render(cluster, "watchNamespaces={team-a,team-b}")
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["roleRef"]["name"].endswith("-tenants") for b in bindings)
    cluster_bindings = [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert cluster_bindings == ["imhub-imhub-operator-discovery"]
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    assert args.namespace == ["team-a", "team-b"]


def test_extra_subjects(cluster: Cluster) -> None:
    docs = _render(
        cluster, "rbac.extraSubjects[0].kind=User", "rbac.extraSubjects[0].name=imhub-operator"
    )
    binding = find(docs, "ClusterRoleBinding", "-tenants")
    assert {"kind": "User", "name": "imhub-operator"} in binding["subjects"]
