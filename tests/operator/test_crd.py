"""The ImTenant CRD: copies in sync, names, validation rules, and defaults that match the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from imhub.operator import crd, spec
from imhub.runtime import tenancy
from tests.realservices import REPO

SOURCE = REPO / "crds" / "imtenant.yaml"
EXAMPLES = sorted((REPO / "crds" / "examples").glob("*.yaml"))


def _version() -> dict[str, Any]:
    version: dict[str, Any] = crd.crd()["spec"]["versions"][0]
    return version


def _spec_schema() -> dict[str, Any]:
    props: dict[str, Any] = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return props


@pytest.mark.parametrize(
    "copy",
    [
        REPO / "operator" / "crds" / "imtenant.yaml",
        REPO / "charts" / "imhub-operator" / "crds" / "imtenant.yaml",
    ],
    ids=["package-data", "helm-chart"],
)
def test_copies_equal_the_source(copy: Path) -> None:
    assert copy.read_bytes() == SOURCE.read_bytes(), (
        f"cp crds/imtenant.yaml {copy.relative_to(REPO)}"
    )


def test_packaged_crd_is_the_source() -> None:
    assert crd.crd_text() == SOURCE.read_text()


def test_names_and_scope() -> None:
    doc = crd.crd()
    assert doc["metadata"]["name"] == f"{spec.PLURAL}.{spec.GROUP}"
    assert doc["spec"]["group"] == spec.GROUP
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["kind"] == spec.KIND
    assert doc["spec"]["names"]["shortNames"] == ["imt"]
    version = _version()
    assert version["name"] == spec.VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c["jsonPath"] for c in _version()["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Gateway"] == ".status.endpoints.gateway"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_tenant_id_pattern_is_the_naming_modules() -> None:
    assert crd.tenant_id_pattern() == tenancy.TENANT_ID_PATTERN
    tenant_id = _spec_schema()["properties"]["tenantId"]
    assert tenant_id["maxLength"] == 32
    rules = [r["rule"] for r in tenant_id["x-kubernetes-validations"]]
    assert rules == ["self == oldSelf"]


def test_validation_bounds() -> None:
    props = _spec_schema()["properties"]
    partitions = props["kafka"]["properties"]["partitions"]
    assert (partitions["minimum"], partitions["maximum"]) == (1, 256)
    assert props["deletionPolicy"]["enum"] == ["Retain", "Delete"]
    assert props["deletionPolicy"]["default"] == "Retain"
    kafka_rules = [r["rule"] for r in props["kafka"]["x-kubernetes-validations"]]
    assert any("self.partitions >= oldSelf.partitions" in r for r in kafka_rules)


def _schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """What the API server's defaulting makes of ``{}`` for this schema."""
    out: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("type") == "object" and "default" in prop:
            out[name] = _schema_defaults(prop)
        elif "default" in prop:
            out[name] = prop["default"]
    return out


def test_schema_defaults_match_the_spec_model() -> None:
    """The operator's fallbacks are the defaults the API server applies."""
    defaulted = {**_schema_defaults(_spec_schema()), "tenantId": "acme"}
    from_server = spec.parse_spec(defaulted)
    from_model = spec.parse_spec({"tenantId": "acme"})
    # allowedContentTypes has no schema default (the runtime's list is used).
    assert from_server.model_dump() == from_model.model_dump()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid_tenants(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == f"{spec.GROUP}/{spec.VERSION}" and doc["kind"] == spec.KIND
    parsed = spec.parse_spec(doc["spec"])
    assert parsed.tenant_id == doc["metadata"]["name"]


def test_two_examples_with_both_policies() -> None:
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    assert len({d["spec"]["tenantId"] for d in docs}) >= 2
    assert {d["spec"].get("deletionPolicy", "Retain") for d in docs} == {"Retain", "Delete"}


@pytest.mark.parametrize(
    "bad",
    [{"tenantId": "Bad_Id"}, {"tenantId": "ab"}, {"tenantId": "acme", "kafka": {"partitions": 0}}],
)
def test_spec_model_refuses_what_the_crd_refuses(bad: dict[str, Any]) -> None:
    with pytest.raises(spec.InvalidSpec):
        spec.parse_spec(bad)
