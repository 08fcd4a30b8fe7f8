"""The operator's one gateway: its config follows every alias's status.served (rendering is pure, builders.gateway).

Aliases reconcile concurrently, and all of them write the same ConfigMap and Deployment: one lock
makes each sync read every alias and write the whole config, so no alias's routes are lost to a race.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from kubedistill.api.alias import ModelAlias
from kubedistill.api.models import GROUP, VERSION
from kubedistill.builders import gateway as gw
from kubedistill.builders import recording as rec
from kubedistill.domain.serving import gateway_routes, name_owners
from kubedistill.handlers.recording import recording_plan
from kubedistill.k8s import serving as k8s
from kubedistill.k8s.client import Kube
from kubedistill.recorder import Rule
from kubedistill.settings import GATEWAY_NAME, Settings

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self._lock = asyncio.Lock()

    async def list_aliases(self) -> list[ModelAlias]:
        """Every alias the operator watches (all namespaces unless it was given a list)."""
        paths = (
            [f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/modelaliases" for ns in self.settings.namespaces]
            if self.settings.namespaces
            else [f"/apis/{GROUP}/{VERSION}/modelaliases"]
        )
        aliases: list[ModelAlias] = []
        for path in paths:
            for item in (await self.kube.request("GET", path)).get("items") or []:
                try:
                    aliases.append(ModelAlias.model_validate(item))
                except ValidationError:
                    continue  # admission keeps these out; an older stored object is skipped, not fatal
        return aliases

    async def sync(self) -> None:
        """Render the config from every alias and apply the gateway's objects (a no-op when unchanged)."""
        async with self._lock:
            aliases = [
                a
                for a in await self.list_aliases()
                if not (a.metadata.model_extra or {}).get("deletionTimestamp")
            ]
            owners = name_owners(aliases)
            keys: dict[str, str] = {}
            routes: list[gw.Route] = []
            rules: dict[str, Rule] = {}
            operator_keys = False
            for alias in aliases:
                namespace = alias.metadata.namespace or "default"
                if owners.get(alias.metadata.name) != (namespace, alias.metadata.name):
                    continue
                key_env = await self._provider_keys(alias, keys)
                routes += gateway_routes(alias, self.settings, key_env)
                plan, values = await recording_plan(self.kube, alias, self.settings)
                if plan is not None and plan.rule is not None:
                    rules[alias.metadata.name] = plan.rule
                    keys.update(values)
                    operator_keys = operator_keys or plan.uses_operator_keys
            config = gw.render_config(routes, master_key=bool(self.settings.gateway_master_key_secret))
            config = rec.with_callback(config, rules)
            files = rec.config_files(rules)
            checksum = gw.checksum(config + "".join(files.values()), keys)
            longest = max((r.timeout_seconds for r in routes), default=120)
            config_map = gw.build_config_map(config, checksum, self.settings)
            deployment = gw.build_deployment(checksum, self.settings, longest)
            env = rec.operator_key_env(self.settings.storage_secret, operator_keys)
            rec.add_to_gateway(config_map, deployment, files, env)
            for manifest in (
                config_map,
                gw.build_keys_secret(keys, self.settings),
                gw.build_service(self.settings),
                deployment,
            ):
                await k8s.apply(self.kube, manifest)

    async def _provider_keys(self, alias: ModelAlias, keys: dict[str, str]) -> dict[tuple[str, str], str]:
        """Copy the keys this alias's provider routes name into `keys`; (secret, key) → env var."""
        namespace = alias.metadata.namespace or "default"
        env: dict[tuple[str, str], str] = {}
        for served in alias.status.served if alias.status else []:
            ref = served.target.provider.api_key_secret_ref if served.target.provider else None
            if ref is None:
                continue
            value = await k8s.read_secret_value(self.kube, namespace, ref.name, ref.key)
            if value is None:
                log.warning("provider key Secret %s/%s (key %s) not found", namespace, ref.name, ref.key)
                continue
            name = gw.key_env_name(namespace, ref.name, ref.key)
            keys[name] = value
            env[(ref.name, ref.key)] = name
        return env

    async def rolled_out_ids(self) -> frozenset[str] | None:
        """Deployment ids every gateway pod routes to now; None while a rollout is under way."""
        ns = self.settings.gateway_namespace
        deployment = await k8s.get(self.kube, "Deployment", ns, GATEWAY_NAME)
        config_map = await k8s.get(self.kube, "ConfigMap", ns, gw.CONFIG_MAP)
        config = gw.rolled_out_config(deployment, config_map)
        return gw.routed_ids(config) if config is not None else None


def is_gateway(body: dict[str, Any], settings: Settings) -> bool:
    meta = body.get("metadata") or {}
    return meta.get("name") == GATEWAY_NAME and meta.get("namespace") == settings.gateway_namespace
