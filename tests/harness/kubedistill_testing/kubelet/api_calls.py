"""What the local kubelet asks of the API server for its Pods: their config, identity, events and status,
and whether a user may read their logs."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubedistill_testing.kubelet.containers import ConfigError, now

log = logging.getLogger(__name__)

Pod = dict[str, Any]
# The client would send a dict as a JSON patch; conditions and containerStatuses merge by key this way.
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class PodApiCalls:
    """The API calls of :class:`~kubedistill_testing.kubelet.node.LocalKubelet`, kept apart from its loops."""

    api: client.ApiClient
    core: client.CoreV1Api
    node_name: str

    def _authorize(self, user: str, groups: list[str]) -> bool:
        """May this user read the node's logs? The API server decides, as for a kubelet in webhook mode."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": groups,
                "resourceAttributes": {"verb": "get", "resource": "nodes", "subresource": "proxy",
                                       "name": self.node_name},
            },
        }  # fmt: skip
        try:
            response = client.AuthorizationV1Api(self.api).create_subject_access_review(
                review, _preload_content=False
            )
        except ApiException as err:
            log.warning("local kubelet: SubjectAccessReview for %s failed: %s", user, err.reason)
            return False
        return bool(json.loads(response.data).get("status", {}).get("allowed"))

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiException):
            # With a body the API server ignores the gracePeriodSeconds query parameter: it goes in the body.
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
            self.core.delete_namespaced_pod(name, namespace, body=body)

    def _lookup(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        try:
            if kind == "secret":
                data = self.core.read_namespaced_secret(name, namespace).data or {}
                return {key: _b64(value) for key, value in data.items()}
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _service_account_dir(self, pod: Pod, directory: Path) -> Path | None:
        """Write a TokenRequest token bound to the Pod, the CA and the namespace; None if not mounted."""
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        account = spec.get("serviceAccountName") or "default"
        try:
            response = self.core.create_namespaced_service_account_token(
                account, meta["namespace"], request, _preload_content=False
            )
        except ApiException as err:
            raise ConfigError(
                "CreateContainerConfigError", f"token for serviceaccount {account}: {err.reason}"
            ) from err
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(json.loads(response.data)["status"]["token"])
        (directory / "namespace").write_text(meta["namespace"])
        ca_file = self.api.configuration.ssl_ca_cert
        if ca_file:
            shutil.copyfile(ca_file, directory / "ca.crt")
        return directory

    def _record_event(self, pod: Pod, container: str, kind: str, reason: str, message: str) -> None:
        """An Event on the Pod, as `kubectl describe pod` shows a node's (Unhealthy, Killing, BackOff …)."""
        meta, stamp = pod["metadata"], now()
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": meta["namespace"],
                               "name": meta["name"], "uid": meta["uid"],
                               "fieldPath": f"spec.containers{{{container}}}"},
            "type": kind, "reason": reason, "message": message, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet", "reportingInstance": self.node_name,
        }  # fmt: skip
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False)
        except ApiException as err:  # a namespace being deleted refuses new events
            log.debug(
                "local kubelet: event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err.reason
            )

    def _patch_status(self, pod: Pod, status: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}, _content_type=STRATEGIC_MERGE
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("local kubelet: status of %s/%s: %s", meta["namespace"], meta["name"], err.reason)


def _b64(value: str) -> str:
    return base64.b64decode(value).decode("utf-8", errors="replace")
