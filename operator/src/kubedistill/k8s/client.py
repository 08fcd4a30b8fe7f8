"""A small async client for the Kubernetes REST API: JSON in, dicts out.

Connection details (kubeconfig, in-cluster token, client certificates, exec plugins) come from the
`kubernetes` package's loaders; requests go through one aiohttp session so the operator's event
loop never blocks on I/O and the per-request cost stays a few hundred microseconds.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
from kubernetes import config as k8s_config
from kubernetes.client import Configuration

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code, the message is the API server's own (never a secret)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def load_configuration(kubeconfig: str | None = None) -> Configuration:
    """In-cluster config inside a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    cfg = Configuration()
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
            return cfg
        except k8s_config.ConfigException:
            pass
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return cfg


class Kube:
    """One session to one API server. `requests` counts calls (the scale benchmark reports it)."""

    def __init__(self, cfg: Configuration) -> None:
        self.cfg = cfg
        self.requests = 0
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls, kubeconfig: str | None = None) -> Kube:
        return cls(load_configuration(kubeconfig))

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.cfg.host.startswith("https"):
            return False
        context = (
            ssl.create_default_context(cafile=self.cfg.ssl_ca_cert)
            if self.cfg.ssl_ca_cert
            else ssl.create_default_context()
        )
        if not self.cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cfg.cert_file:
            context.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        return context

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=64)
            self._session = aiohttp.ClientSession(
                base_url=self.cfg.host.rstrip("/") + "/",
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def _headers(self, content_type: str | None, accept: str | None) -> dict[str, str]:
        headers = {"Accept": accept or "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.cfg.get_api_key_with_prefix("authorization")
        if token:
            headers["Authorization"] = token
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str | None = None,
    ) -> dict[str, Any]:
        self.requests += 1
        data = json.dumps(body) if body is not None else None
        session = self._session_now()
        headers = self._headers(content_type if data is not None else None, accept)
        async with session.request(
            method, path.lstrip("/"), params=params, data=data, headers=headers
        ) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", ""), status.get("message", text)
                except json.JSONDecodeError:
                    reason, message = response.reason or "", text[:512]
                raise ApiError(response.status, reason, message)
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
