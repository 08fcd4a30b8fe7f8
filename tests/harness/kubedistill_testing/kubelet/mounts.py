"""Each container process in a private mount namespace, with the Pod's /etc/hosts bound over the node's.

`unshare --mount --propagation private` gives the process a copy of the node's mounts that nothing it
does reaches back from; a small shell script then binds the Pod's hosts file over /etc/hosts and execs
the container's argv, so the process keeps the pid the kubelet started (its process group, signals and
exit code are the container's). The kubelet rewrites the hosts file in place, which the bind mount sees.

Where the machine does not allow it (`unshare` missing, or not permitted), `namespace_support` says why
and containers run as plain processes, resolving names as the node does.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

# $1: the Pod's hosts file; then the container's argv.
_SCRIPT = 'set -e; mount --bind "$1" /etc/hosts; shift; exec "$@"'


def namespace_support() -> str | None:
    """None if a private mount namespace can be made here, else why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare is not installed"
    try:
        probe = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "mount", "--bind", "/etc/hosts", "/etc/hosts"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare failed: {err}"
    if probe.returncode != 0:
        return f"unshare --mount failed: {probe.stderr.strip() or probe.returncode}"
    return None


def in_namespace(unshare: str, argv: Sequence[str], hosts: Path) -> list[str]:
    """`argv` run in a private mount namespace that sees `hosts` as /etc/hosts."""
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", _SCRIPT, "sh", str(hosts), *argv]


def write_in_place(path: Path, content: str) -> None:
    """Replace `path`'s content keeping its inode: a bind mount of the file sees the new content (a rename
    would leave the mounts on the old file)."""
    data = content.encode()
    with path.open("r+b" if path.exists() else "wb") as handle:
        handle.write(data)
        handle.truncate(len(data))
