"""The Dockerfile ENV parser the real-stages e2e test builds its pods' environment from."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubedistill_testing.image_env import DockerfileError, dockerfile_env, dockerfile_workdir, translate_paths

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILE = """
FROM builder AS build
ENV ONLY_IN_BUILD=1
FROM runtime
# a comment
ENV PATH=/opt/venv/bin:$PATH \\
    HOME=/tmp \\
    CACHE=${HOME}/cache
ENV QUOTED="two words" LEGACY_IS_NEXT=1
ENV LEGACY some value
ENV AFTER=$CACHE/x
"""


def test_the_final_stage_only_in_order_with_dockers_expansion() -> None:
    env = dockerfile_env(DOCKERFILE, base={"PATH": "/usr/bin", "HOME": "/root"})
    assert env == {
        "PATH": "/opt/venv/bin:/usr/bin",
        "HOME": "/tmp",
        # Within one ENV instruction a reference sees the value from before it, as in Docker.
        "CACHE": "/root/cache",
        "QUOTED": "two words",
        "LEGACY_IS_NEXT": "1",
        "LEGACY": "some value",
        "AFTER": "/root/cache/x",
    }


def test_image_paths_are_translated_and_the_base_is_not() -> None:
    env = dockerfile_env(
        DOCKERFILE, base={"PATH": "/tmp/host-bin:/usr/bin"}, filesystem={"/opt/venv": "/venv", "/tmp": "/t"}
    )
    assert env["PATH"] == "/venv/bin:/tmp/host-bin:/usr/bin"
    assert env["HOME"] == "/t" and env["CACHE"] == "/cache"  # ${HOME} of the base was unset
    assert (
        translate_paths("/tmpfoo:/tmp/a:/opt/venv", {"/tmp/": "/t", "/opt/venv": "/v"}) == "/tmpfoo:/t/a:/v"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ENV A=1\nFROM x", "before the first FROM"),
        ("RUN x", "no FROM"),
        ("FROM x\nENV A=1 B", "not NAME=VALUE"),
    ],
)
def test_what_it_cannot_read_is_an_error(text: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        dockerfile_env(text)


def test_the_images_of_this_repository_parse() -> None:
    trainer = dockerfile_env((ROOT / "trainer-image" / "Dockerfile").read_text(), base={"PATH": "/usr/bin"})
    assert trainer["KUBEDISTILL_LLAMA_CPP_DIR"] == "/opt/llama.cpp" and trainer["HOME"] == "/tmp"
    operator = dockerfile_env((ROOT / "operator" / "Dockerfile").read_text(), base={"PATH": "/usr/bin"})
    assert operator["PATH"] == "/opt/venv/bin:/usr/bin"


def test_the_final_stages_workdir_is_where_its_containers_start() -> None:
    assert dockerfile_workdir("FROM a\nWORKDIR /src\nFROM b\nWORKDIR /app\nWORKDIR data\n") == "/app/data"
    assert dockerfile_workdir("FROM a\nWORKDIR /src\nFROM b\n") == "/"
    assert dockerfile_workdir((ROOT / "trainer-image" / "Dockerfile").read_text()) == "/tmp"
