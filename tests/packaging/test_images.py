"""The two container images: hadolint-clean, pinned bases, non-root, and every Python package they
install is the exact pin of pyproject.toml (no Docker engine here, so the Dockerfiles are read)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kubedistill_testing.image_env import instructions as dockerfile_instructions
from kubedistill_trainer import export

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer-image" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"

Instruction = tuple[str, str]


def instructions(path: Path) -> list[Instruction]:
    return dockerfile_instructions(path.read_text())


def build_args(ins: list[Instruction]) -> dict[str, str]:
    return dict(rest.split("=", 1) for kw, rest in ins if kw == "ARG" and "=" in rest)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def pip_requirements(ins: list[Instruction]) -> list[str]:
    """Every requirement named on a `pip install`/`pip download` line, build args substituted."""
    args = build_args(ins)
    reqs: list[str] = []
    for kw, rest in ins:
        if kw != "RUN":
            continue
        for command in re.split(r"&&|;", expand(rest, args)):
            words = shlex.split(command)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)  # leading VAR=value assignments
            if (
                len(words) < 2
                or Path(words[0]).name not in ("pip", "pip3")
                or words[1] not in ("install", "download")
            ):
                continue
            skip_next = False
            for word in words[2:]:
                if skip_next:
                    skip_next = False
                elif word in (
                    "--index-url",
                    "--find-links",
                    "-d",
                    "--dest",
                    "-r",
                    "-c",
                    "--no-binary",
                    "--only-binary",
                ):
                    skip_next = True
                elif not word.startswith("-"):
                    reqs.append(word)
    return reqs


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """Normalised distribution name -> exact version, over dependencies and every extra."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    specs = list(project["dependencies"]) + [
        s for extra in project["optional-dependencies"].values() for s in extra
    ]
    out: dict[str, str] = {}
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", spec)
        assert match, f"pyproject.toml: {spec!r} is not an exact pin"
        out[normalise(match.group(1))] = match.group(3)
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras() -> set[str]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return set(project["optional-dependencies"])


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_every_python_package_installed_is_a_pyproject_pin(dockerfile: Path) -> None:
    known, known_extras = pins(), extras()
    reqs = pip_requirements(instructions(dockerfile))
    assert reqs, "no pip install found: the parser no longer understands the Dockerfile"
    for req in reqs:
        local = re.fullmatch(r"\.\[([\w,\-]+)\]", req)
        if local:
            assert set(local.group(1).split(",")) <= known_extras, f"{req}: not an extra of pyproject.toml"
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", req)
        assert match, f"{dockerfile.name}: {req!r} is neither the project's extras nor an exact pin"
        name, version = normalise(match.group(1)), match.group(3)
        assert known.get(name) == version, f"{req}: pyproject.toml pins {name}=={known.get(name)}"


def test_the_operator_image_installs_only_the_operator_extra() -> None:
    assert pip_requirements(instructions(OPERATOR)) == [".[operator]"]


def test_the_trainer_image_installs_the_ml_stack_and_builds_llama_cpp_portably() -> None:
    ins = instructions(TRAINER)
    reqs = pip_requirements(ins)
    assert ".[trainer,gguf,gpu]" in reqs
    assert f"torch=={pins()['torch']}" in reqs and f"llama-cpp-python=={pins()['llama-cpp-python']}" in reqs
    assert "unsloth" in {normalise(n) for n in pins()} and "gpu" in extras()
    runs = " ".join(rest for kw, rest in ins if kw == "RUN")
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install' in runs
    # The converter comes from the very llama-cpp-python sdist that is compiled, and the export stage
    # finds it where the image puts it.
    assert re.search(r'/vendor/llama\.cpp"?\s+/opt/llama\.cpp', runs)
    assert build_args(ins)["LLAMA_CPP_PYTHON_VERSION"] == export.LLAMA_CPP_VERSION
    env = " ".join(rest for kw, rest in ins if kw == "ENV")
    assert f"{export.LLAMA_CPP_DIR_ENV}=/opt/llama.cpp" in env
    assert "HF_HOME=/tmp/" in env and "HOME=/tmp" in env  # read-only root filesystem in stage Pods


@pytest.mark.parametrize(
    ("dockerfile", "base", "entrypoint"),
    [
        (OPERATOR, r"python:3\.11\.\d+-slim(-\w+)?", ["python", "-m", "kubedistill.handlers"]),
        (
            TRAINER,
            r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d+\.\d+",
            ["python", "-m", "kubedistill_trainer"],
        ),
    ],
    ids=["operator", "trainer"],
)
def test_pinned_base_non_root_user_and_entrypoint(dockerfile: Path, base: str, entrypoint: list[str]) -> None:
    ins = instructions(dockerfile)
    args = build_args(ins)
    froms = [expand(rest, args).split()[0] for kw, rest in ins if kw == "FROM"]
    assert froms and all(re.fullmatch(base, image) for image in froms), froms
    users = [rest for kw, rest in ins if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), (
        f"last USER must be a numeric non-root uid:gid: {users}"
    )
    assert json.loads([rest for kw, rest in ins if kw == "ENTRYPOINT"][-1]) == entrypoint


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_copied_sources_exist(dockerfile: Path) -> None:
    for kw, rest in instructions(dockerfile):
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
