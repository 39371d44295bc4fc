"""The ``ImTenant`` CRD as shipped with the package.

``crds/imtenant.yaml`` at the top of the repository is the source of truth;
``operator/crds/imtenant.yaml`` is a copy installed as package data (a test
keeps the two equal), so the operator and its tests find the CRD the same
way whether imhub is installed from a wheel or run from a checkout.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

__all__ = ["crd", "crd_text", "tenant_id_pattern"]


def crd_text() -> str:
    return resources.files(__package__).joinpath("crds", "imtenant.yaml").read_text("utf-8")


def crd() -> dict[str, Any]:
    doc = yaml.safe_load(crd_text())
    if not isinstance(doc, dict):
        raise RuntimeError("the packaged CRD is not a YAML mapping")
    return doc


def tenant_id_pattern() -> str:
    """The ``spec.tenantId`` pattern the API server enforces."""
    version = crd()["spec"]["versions"][0]
    return str(
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tenantId"][
            "pattern"
        ]
    )
