"""kubedistill: distil a team's LLM traffic into a small, cheap model, on Kubernetes or locally.

from kubedistill import Distiller
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubedistill.sdk import Distiller

__all__ = ["Distiller"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import kubedistill.api` (the operator, the stage pods) does not load the SDK.
    if name == "Distiller":
        from kubedistill.sdk import Distiller

        return Distiller
    raise AttributeError(f"module 'kubedistill' has no attribute {name!r}")
