#!/usr/bin/env python3
"""Write templates/crds/*.yaml from the repository's crds/ (generated from the API models).

The spec of each CRD is copied verbatim; only its metadata is templated, the cert-manager way:
rendered when `crds.enabled`, annotated `helm.sh/resource-policy: keep` when `crds.keep`.

    python charts/kubedistill/hack/sync-crds.py           # rewrite the chart's copies
    python charts/kubedistill/hack/sync-crds.py --check   # exit 1 when they are stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1]
SOURCE = CHART.parents[1] / "crds"
TARGET = CHART / "templates" / "crds"


def template(crd_text: str, source_name: str) -> str:
    """The chart template of one CRD file: generated metadata, then the source's spec line for line."""
    crd = yaml.safe_load(crd_text)
    if "{{" in crd_text or "}}" in crd_text:
        raise ValueError(f"{source_name} contains '{{{{' or '}}}}', which Helm would read as a template")
    lines = crd_text.splitlines(keepends=True)
    spec_at = lines.index("spec:\n")
    labels = "".join(
        f"    {key}: {value}\n" for key, value in sorted((crd["metadata"].get("labels") or {}).items())
    )
    head = (
        f"{{{{- /* Generated from crds/{source_name} by hack/sync-crds.py; do not edit. */}}}}\n"
        "{{- if .Values.crds.enabled }}\n"
        f"apiVersion: {crd['apiVersion']}\n"
        f"kind: {crd['kind']}\n"
        "metadata:\n"
        f"  name: {crd['metadata']['name']}\n"
        "  labels:\n"
        f"{labels}"
        '    {{- include "kubedistill.crdLabels" . | nindent 4 }}\n'
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
    )
    return head + "".join(lines[spec_at:]) + "{{- end }}\n"


def expected() -> dict[Path, str]:
    return {TARGET / p.name: template(p.read_text(), p.name) for p in sorted(SOURCE.glob("*.yaml"))}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when the chart's CRDs are stale")
    check = parser.parse_args().check
    want = expected()
    have = {p: p.read_text() for p in TARGET.glob("*.yaml")}
    if check:
        stale = sorted(str(p.relative_to(CHART)) for p in set(want) | set(have) if want.get(p) != have.get(p))
        if stale:
            print(
                f"stale chart CRDs ({', '.join(stale)}): run python charts/kubedistill/hack/sync-crds.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.mkdir(parents=True, exist_ok=True)
    for path in set(have) - set(want):
        path.unlink()
    for path, text in want.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
