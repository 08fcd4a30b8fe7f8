"""A Pod's volumes on this machine, where its processes start, and what a read-only root filesystem
leaves writable (:mod:`.mounts` enforces it, or the kubelet checks it afterwards with these)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubedistill_testing.kubelet.containers import ConfigError, Lookup, configmap_volume_files, remap_path
from kubedistill_testing.kubelet.mounts import snapshot, written

Pod = Mapping[str, Any]
Bind = tuple[str, Path]  # ("rw"|"ro", a directory the container has as a mount of its own)
SHOWN_FILES = 20


def host_path(source: Mapping[str, Any]) -> Path:
    """A hostPath volume's directory, made for `DirectoryOrCreate`; a kubelet's type check otherwise."""
    path, kind = Path(source["path"]), source.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise ConfigError(
            "CreateContainerConfigError", f"hostPath type check failed: {path} is not a directory"
        )
    return path


def make_volumes(pod: Pod, directory: Path, lookup: Lookup) -> dict[str, Path]:
    """Make the Pod's volumes under `directory`; volume name → local directory.

    An emptyDir is one directory that the Pod's init containers and containers share (removed with the
    Pod by the kubelet); a configMap volume holds its keys as files; a hostPath is the node's directory.
    Other kinds are not made, and their mounts are ignored."""
    namespace = pod["metadata"]["namespace"]
    made = {}
    for volume in pod["spec"].get("volumes") or []:
        local = directory / volume["name"]
        if "emptyDir" in volume:
            local.mkdir(parents=True, exist_ok=True)
            made[volume["name"]] = local
        elif "hostPath" in volume:
            made[volume["name"]] = host_path(volume["hostPath"])
        elif "configMap" in volume:
            source = volume["configMap"]
            data = lookup("configmap", namespace, source["name"])
            if data is None and not source.get("optional"):
                raise ConfigError("CreateContainerConfigError", f'configmap "{source["name"]}" not found')
            for relative, content in configmap_volume_files(source, data or {}).items():
                path = local / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
            local.mkdir(parents=True, exist_ok=True)
            made[volume["name"]] = local
    return made


def volume_binds(pod: Pod, mounts: Sequence[Mapping[str, Any]], volumes: Mapping[str, Path]) -> list[Bind]:
    """Each mounted volume's directory and its mode: configMap volumes and readOnly mounts are read-only."""
    config_maps = {v["name"] for v in pod["spec"].get("volumes") or [] if "configMap" in v}
    return [
        ("ro" if m.get("readOnly") or m["name"] in config_maps else "rw", volumes[m["name"]]) for m in mounts
    ]


def working_dir(workdir: str | None, mounts: Mapping[str, Path], pod_dir: Path, image_root: Path) -> str:
    """Where the process starts: `workdir` (workingDir, or the image's WORKDIR) as this machine has it, a
    directory in a volume made as a runtime makes it; otherwise `image_root`, which stands for the image's
    root filesystem (read-only with readOnlyRootFilesystem)."""
    local = Path(remap_path(workdir, mounts)) if workdir else None
    if local is not None and local.is_relative_to(pod_dir):
        local.mkdir(parents=True, exist_ok=True)
    if local is None or not local.is_dir():
        local = image_root
        local.mkdir(parents=True, exist_ok=True)
    return str(local)


def watched_dirs(cwd: str, binds: Sequence[Bind], repository: Sequence[Path]) -> list[Path]:
    """Where a container with a read-only root would leave files: the repository, and its working
    directory unless that is one of its volumes."""
    in_volume = any(Path(cwd).is_relative_to(directory) for _, directory in binds)
    return [*repository, *([] if in_volume else [Path(cwd)])]


def leaked_files(
    before: Mapping[str, int], cwd: str, binds: Sequence[Bind], repository: Sequence[Path]
) -> list[str]:
    """The files written since `before` under the watched directories, but for those in a volume."""
    volumes = tuple(str(directory) + os.sep for _, directory in binds)
    after = snapshot(watched_dirs(cwd, binds, repository))
    return [path for path in written(before, after) if not path.startswith(volumes)]


def leak_message(leaked: Sequence[str], why: str) -> str:
    shown = ", ".join(leaked[:SHOWN_FILES])
    if len(leaked) > SHOWN_FILES:
        shown += f" and {len(leaked) - SHOWN_FILES} more"
    return (
        f"with readOnlyRootFilesystem the container wrote outside its volumes: {shown} "
        f"(the local kubelet checks this afterwards here: {why})"
    )
