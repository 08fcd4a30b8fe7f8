"""What the local kubelet makes read-only, where a process starts, and what it counts as a write outside a
container's volumes (the pure parts of the mount namespace and its fallback check)."""

from __future__ import annotations

import os
from pathlib import Path

from kubedistill_testing.kubelet.mounts import in_namespace, snapshot, writable_mounts, written
from kubedistill_testing.kubelet.volumes import leaked_files, volume_binds, watched_dirs, working_dir

MOUNTS_TABLE = """proc /proc proc rw,relatime 0 0
devtmpfs /dev devtmpfs rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime 0 0
/dev/vda / ext4 rw,relatime,discard 0 0
/dev/vdb /work ext4 rw,relatime 0 0
tools /mnt/tools tmpfs ro,nosuid 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
/dev/vdb /work ext4 rw,relatime 0 0
/dev/vdc /srv/my\\040data ext4 rw 0 0
"""


def test_a_read_only_root_covers_every_writable_mount_but_the_containers_own() -> None:
    assert writable_mounts(MOUNTS_TABLE) == ["/", "/work", "/srv/my data"]


def test_the_namespace_script_gets_hosts_binds_read_only_mounts_and_argv_in_order() -> None:
    argv = in_namespace(
        "/usr/bin/unshare",
        ["python", "-c", "x"],
        Path("/k/hosts"),
        [("rw", Path("/v/a")), ("ro", Path("/v/b"))],
        ["/"],
    )
    assert argv[:5] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh"]
    assert argv[7:] == ["sh", "/k/hosts", "rw", "/v/a", "ro", "/v/b", "--", "/", "--", "python", "-c", "x"]


def test_config_maps_and_read_only_mounts_are_bound_read_only() -> None:
    pod = {"spec": {"volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "c"}},
                                {"name": "data", "emptyDir": {}}]}}  # fmt: skip
    volumes = {"tmp": Path("/v/tmp"), "cfg": Path("/v/cfg"), "data": Path("/v/data")}
    mounts = [{"name": "tmp"}, {"name": "cfg"}, {"name": "data", "readOnly": True}]
    assert volume_binds(pod, mounts, volumes) == [
        ("rw", Path("/v/tmp")),
        ("ro", Path("/v/cfg")),
        ("ro", Path("/v/data")),
    ]


def test_a_process_starts_in_its_working_dir_in_a_volume_else_in_the_images_root(tmp_path: Path) -> None:
    pod_dir, image_root = tmp_path / "pod", tmp_path / "pod" / "rootfs" / "main"
    # Not /tmp: the checkout (and tmp_path) may well be under /tmp on the machine running this.
    mounts = {"/scratch": pod_dir / "volumes" / "scratch"}
    volume_work = pod_dir / "volumes" / "scratch" / "work"
    assert working_dir("/scratch/work", mounts, pod_dir, image_root) == str(volume_work)
    assert volume_work.is_dir()  # made, as a runtime makes it
    here = str(tmp_path)  # a directory of this machine's, under no mount
    assert working_dir(here, mounts, pod_dir, image_root) == here
    assert working_dir("/no/such/dir", mounts, pod_dir, image_root) == str(image_root)
    assert working_dir(None, mounts, pod_dir, image_root) == str(image_root)


def test_files_written_outside_the_volumes_are_listed(tmp_path: Path) -> None:
    repo, cwd, volume = tmp_path / "repo", tmp_path / "rootfs", tmp_path / "repo" / "vol"
    for directory in (repo / "__pycache__", cwd, volume):
        directory.mkdir(parents=True)
    (repo / "kept.txt").write_text("a")
    (repo / "changed.txt").write_text("a")
    binds = [("rw", volume)]
    assert watched_dirs(str(cwd), binds, [repo]) == [repo, cwd]
    assert watched_dirs(str(volume), binds, [repo]) == [repo]
    before = snapshot([repo, cwd])
    (repo / "new.txt").write_text("b")
    os.utime(repo / "changed.txt", ns=(1, 1))
    (cwd / "out.json").write_text("{}")
    (volume / "fine.bin").write_text("ok")
    (repo / "__pycache__" / "m.pyc").write_text("the test run's own")
    assert written(before, snapshot([repo, cwd])) == sorted(
        str(p) for p in (repo / "new.txt", repo / "changed.txt", cwd / "out.json", volume / "fine.bin")
    )
    assert leaked_files(before, str(cwd), binds, [repo]) == sorted(
        str(p) for p in (repo / "new.txt", repo / "changed.txt", cwd / "out.json")
    )
