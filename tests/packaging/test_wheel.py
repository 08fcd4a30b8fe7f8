"""What ships: the wheel (and so the images, which `pip install .`) holds the product alone.

The test harness is a distribution of its own (tests/harness); local mode's smoke preset needs only
the product's scripted teacher and tiny model builder.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "operator" / "src", ROOT / "trainer-image" / "src"]


def test_the_wheel_holds_the_product_and_no_test_harness(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kubedistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "kubedistill",
        "kubedistill_trainer",
        wheel.name.rsplit("-", 3)[0] + ".dist-info",
    }
    assert not [n for n in names if "kubedistill_testing" in n or "/testing/" in n or n.startswith("tests/")]
    assert "kubedistill/local/scripted_teacher.py" in names and "kubedistill/local/tiny_model.py" in names


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_product_never_imports_the_test_harness() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for src in PRODUCT
        for path in src.rglob("*.py")
        if any(m.split(".")[0] == "kubedistill_testing" for m in imported_modules(path))
    ]
    assert offenders == []
