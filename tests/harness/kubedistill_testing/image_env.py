"""The environment an image gives its containers, read from its Dockerfile's `ENV` lines.

The local kubelet runs containers as local processes, so nothing of an image but its entrypoint
exists here. What the image's `ENV` lines set (where llama.cpp's converter lies, where caches go) is
part of the contract between the image and the stage code; a test that runs the stages with this
environment fails when the two drift apart, instead of passing on whatever this shell had set.

    env = dockerfile_env(
        Path("trainer-image/Dockerfile").read_text(),
        base={"PATH": os.environ["PATH"]},             # the base image's environment
        filesystem={"/opt/venv": sys.prefix, "/tmp": tmp_path},  # image paths -> this machine's
    )

Only the final stage counts (what `docker build` ships); `$VAR` and `${VAR}` expand against the
stage's earlier `ENV` values, then `base`, as Docker does. Image paths are translated before the
expansion, so `base` (this machine's values) is never translated.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.kubelet.containers import inherited_env

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(ValueError):
    """An `ENV` line this parser does not understand."""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    if pending:
        raise DockerfileError(f"the Dockerfile ends inside a continued line: {pending[:60]!r}")
    return out


def expand(value: str, env: Mapping[str, str]) -> str:
    """Docker's substitution: a defined `$VAR`/`${VAR}` is replaced, an undefined one becomes empty."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    """The (name, raw value) pairs of one `ENV` instruction: `K=V K2="V 2"`, or the old `K V` form."""
    words = shlex.split(arguments, posix=True)
    if words and "=" not in words[0]:
        name, _, value = arguments.partition(" ")
        return [(name, value.strip())]
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise DockerfileError(f"ENV {arguments!r}: {word!r} is not NAME=VALUE")
        pairs.append((name, value))
    return pairs


def dockerfile_env(
    text: str, base: Mapping[str, str] | None = None, filesystem: Mapping[str, str | Path] | None = None
) -> dict[str, str]:
    """What the final stage's `ENV` lines set, in order, each expanded as Docker expands it, with the
    image's paths named in `filesystem` replaced by this machine's (see `translate_paths`)."""
    stages: list[list[str]] = []
    for word, arguments in instructions(text):
        if word == "FROM":
            stages.append([])
        elif word == "ENV":
            if not stages:
                raise DockerfileError("ENV before the first FROM")
            stages[-1].append(arguments)
    if not stages:
        raise DockerfileError("no FROM: not a Dockerfile")
    env: dict[str, str] = {}
    for arguments in stages[-1]:
        # One instruction's values see the environment from before it (Docker's rule).
        before = {**(base or {}), **env}
        env.update(
            {
                name: expand(translate_paths(value, filesystem or {}), before)
                for name, value in env_pairs(arguments)
            }
        )
    return env


def dockerfile_workdir(text: str) -> str:
    """The final stage's WORKDIR (where its containers start), `/` where it sets none."""
    workdir = "/"
    for word, arguments in instructions(text):
        if word == "FROM":
            workdir = "/"
        elif word == "WORKDIR":
            workdir = str(Path(workdir, arguments.strip()))
    return workdir


def translate_paths(value: str, filesystem: Mapping[str, str | Path]) -> str:
    """`value` with image paths replaced by where the same things are on this machine.

    `filesystem` maps image paths to local ones (longest prefix wins); every `:`-separated part of
    the value that is, or lies under, such a path is translated; other parts pass unchanged.
    """
    prefixes = sorted(filesystem, key=len, reverse=True)

    def translate(part: str) -> str:
        for prefix in prefixes:
            root = prefix.rstrip("/")
            if part == root or part.startswith(root + "/"):
                return str(filesystem[prefix]) + part[len(root) :]
        return part

    return ":".join(translate(p) for p in value.split(":"))


@contextmanager
def image_environment(kubelet: LocalKubelet, env: Mapping[str, str]) -> Iterator[None]:
    """While inside: the kubelet's containers start from `env` (an image's ENV) instead of this
    process's environment. PYTHONPATH alone is kept: the image installs the code, here the checkout
    is on the path."""
    saved = kubelet.base_env
    kept = {k: v for k, v in inherited_env(os.environ).items() if k == "PYTHONPATH"}
    kubelet.base_env = {**kept, **env}
    try:
        yield
    finally:
        kubelet.base_env = saved
