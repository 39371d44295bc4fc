"""A small async Kubernetes REST client for the objects the operator owns.

kopf watches ``ImTenant`` objects with its own client; this one creates and
updates the Secrets, Services and Deployments of each tenant. It speaks plain
JSON (dicts in, dicts out) over aiohttp and takes its credentials from the
official client's config loaders, so a kubeconfig (``KUBECONFIG``) and the
in-cluster service account both work, as they do for kopf.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = ["KINDS", "ApiError", "Kind", "Kube"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A Kubernetes API call answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Kind:
    """Where a namespaced kind lives in the API."""

    def __init__(self, api_version: str, kind: str, plural: str) -> None:
        self.api_version = api_version
        self.kind = kind
        self.plural = plural

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


KINDS = {
    "Secret": Kind("v1", "Secret", "secrets"),
    "Service": Kind("v1", "Service", "services"),
    "Deployment": Kind("apps/v1", "Deployment", "deployments"),
    "ImTenant": Kind("imhub.io/v1alpha1", "ImTenant", "imtenants"),
}


def _load_configuration() -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return cfg


class Kube:
    """JSON requests against the API server; one aiohttp session per operator."""

    def __init__(self, configuration: Any | None = None, *, timeout: float = 30.0) -> None:
        self._cfg = configuration if configuration is not None else _load_configuration()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self._cfg.ssl_ca_cert)
        if self._cfg.cert_file:
            ctx.load_cert_chain(self._cfg.cert_file, keyfile=self._cfg.key_file)
        if not self._cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=self._cfg.host.rstrip("/"),
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        bearer = self._cfg.auth_settings().get("BearerToken")
        if bearer:
            headers["Authorization"] = bearer["value"]
        http = await self._http()
        data = json.dumps(body) if body is not None else None
        async with http.request(method, path, data=data, headers=headers, params=params) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", ""), status.get("message", text)
                except ValueError:
                    reason, message = resp.reason or "", text[:500]
                raise ApiError(resp.status, reason, message)
            return json.loads(text) if text else {}

    # -- typed helpers ----------------------------------------------------------

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", KINDS[body["kind"]].path(namespace), body=body)

    async def replace(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        kind = KINDS[body["kind"]]
        return await self.request("PUT", kind.path(namespace, body["metadata"]["name"]), body=body)

    async def merge_patch(
        self,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            KINDS[kind].path(namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (dependents in the background); ``False`` if it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", KINDS[kind].path(namespace, name), body=body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
