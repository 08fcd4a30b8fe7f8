"""Each container process in a private mount namespace: the Pod's /etc/hosts, its volumes' modes, and a
read-only root filesystem when the container asks for one.

`unshare --mount --propagation private` gives the process a copy of the node's mounts that nothing it
does reaches back from; a small shell script then

1. binds the Pod's hosts file over /etc/hosts (the kubelet rewrites that file in place, which the bind
   mount sees);
2. binds each of the container's volume directories onto itself, read-only where the volume is
   (configMap volumes, ``readOnly`` mounts), so each is a mount of its own;
3. with ``readOnlyRootFilesystem``, remounts the node's writable filesystems (all but /proc, /sys and
   /dev, which a container has as its own) read-only: a write anywhere but the container's volumes and
   its termination-log directory fails with EROFS, as in the container's image;
4. execs the container's argv, so the process keeps the pid the kubelet started (its process group,
   signals and exit code are the container's).

Where the machine does not allow it (`unshare` missing, or not permitted), `namespace_support` says why
and containers run as plain processes. Where the read-only remount is not allowed, `read_only_support`
says why and the kubelet falls back to `snapshot`/`written`: it lists the files a container with a
read-only root created or changed under the watched directories and fails the container with them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# $1 the Pod's hosts file; then "rw"|"ro" and a directory per volume; "--"; the mounts to make read-only;
# "--"; the container's argv.
_SCRIPT = """set -e
mount --bind "$1" /etc/hosts
shift
while [ "$1" != -- ]; do
  mount --bind "$2" "$2"
  if [ "$1" = ro ]; then mount -o remount,bind,ro "$2"; fi
  shift 2
done
shift
while [ "$1" != -- ]; do
  mount -o remount,bind,ro "$1"
  shift
done
shift
exec "$@"
"""
# What a container has of its own even with a read-only root filesystem.
CONTAINER_OWN = ("/proc", "/sys", "/dev")
# Never a container's doing: caches of the test run itself.
SNAPSHOT_SKIPPED = frozenset({".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv"})


def in_namespace(
    unshare: str,
    argv: Sequence[str],
    hosts: Path,
    binds: Sequence[tuple[str, Path]] = (),
    read_only: Sequence[str] = (),
) -> list[str]:
    """`argv` in a private mount namespace that sees `hosts` as /etc/hosts, each (mode, directory) of
    `binds` as a mount of its own, and the mounts at `read_only` read-only."""
    bound = [part for mode, directory in binds for part in (mode, str(directory))]
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", _SCRIPT, "sh", str(hosts),
            *bound, "--", *read_only, "--", *argv]  # fmt: skip


def writable_mounts(mounts_table: str) -> list[str]:
    """The mount points of `/proc/self/mounts` that a read-only root filesystem makes read-only: every
    writable one but those under /proc, /sys and /dev, each once."""
    points: list[str] = []
    for line in mounts_table.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        own = any(point == p or point.startswith(p + "/") for p in CONTAINER_OWN)
        if own or "ro" in fields[3].split(",") or point in points:
            continue
        points.append(point)
    return points


def _probe(argv: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if result.returncode == 0 else (result.stderr.strip() or f"exit code {result.returncode}")


def namespace_support(unshare: str | None) -> str | None:
    """None if a private mount namespace with its own /etc/hosts can be made here, else why not."""
    if unshare is None:
        return "unshare is not installed"
    problem = _probe(in_namespace(unshare, ["true"], Path("/etc/hosts")))
    return None if problem is None else f"unshare --mount failed: {problem}"


def read_only_support(unshare: str, read_only: Sequence[str]) -> str | None:
    """None if these mounts can be made read-only in a private mount namespace, else why not."""
    problem = _probe(in_namespace(unshare, ["true"], Path("/etc/hosts"), read_only=read_only))
    return None if problem is None else f"remounting {', '.join(read_only)} read-only failed: {problem}"


@dataclass(frozen=True)
class MountSupport:
    """What this machine allows the kubelet: `unshare` (None: no mount namespaces, `namespace_problem`
    says why) and the mounts a read-only root makes read-only (`read_only_problem`: why it cannot)."""

    unshare: str | None
    namespace_problem: str | None
    read_only_mounts: list[str]
    read_only_problem: str | None


def mount_support() -> MountSupport:
    """Find out once, when the kubelet starts, and say why not (one warning each)."""
    unshare = shutil.which("unshare")
    problem = namespace_support(unshare)
    if unshare is None or problem:
        log.warning(
            "local kubelet: containers run without a private mount namespace (%s): Pods resolve names as "
            "this machine does, and a read-only root filesystem is checked after each container exits",
            problem,
        )
        return MountSupport(None, problem, [], problem)
    mounts = writable_mounts(Path("/proc/self/mounts").read_text())
    read_only_problem = read_only_support(unshare, mounts)
    if read_only_problem:
        log.warning(
            "local kubelet: a read-only root filesystem is checked after each container exits (%s)",
            read_only_problem,
        )
    return MountSupport(unshare, None, mounts, read_only_problem)


def snapshot(roots: Iterable[Path]) -> dict[str, int]:
    """Every file under `roots` (but the test run's own caches) → its modification time in ns."""
    seen: dict[str, int] = {}
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in SNAPSHOT_SKIPPED]
            for name in files:
                path = os.path.join(directory, name)
                try:
                    seen[path] = os.stat(path, follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
    return seen


def written(before: Mapping[str, int], after: Mapping[str, int]) -> list[str]:
    """The files created or modified between two snapshots, sorted."""
    return sorted(path for path, mtime in after.items() if before.get(path) != mtime)


def write_in_place(path: Path, content: str) -> None:
    """Replace `path`'s content keeping its inode: a bind mount of the file sees the new content (a rename
    would leave the mounts on the old file)."""
    data = content.encode()
    with path.open("r+b" if path.exists() else "wb") as handle:
        handle.write(data)
        handle.truncate(len(data))
