"""Run the Argo CD health checks of deploy/argocd/health/ the way Argo CD does: Lua 5.1 (gopher-lua's
dialect), the object as the global `obj`, and only the globals Argo CD gives a health script — so a
script reaching for io, os or require fails here as it would there. Needs `lupa` (the dev extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lupa import lua51

from kubedistill_testing.paths import repo_root


def health_dir() -> Path:
    return repo_root() / "deploy" / "argocd" / "health"


_SANDBOX = """
return function(src, obj)
  local chunk = assert(loadstring(src))
  setfenv(chunk, {obj = obj, ipairs = ipairs, pairs = pairs, tostring = tostring, tonumber = tonumber,
                  type = type, string = string, table = table, math = math, error = error})
  return chunk()
end
"""


def run_health_script(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of one health script over one object."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    hs = lua.execute(_SANDBOX)(script, lua.table_from(obj, recursive=True))
    return str(hs["status"]), str(hs["message"])


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """The health Argo CD would show for a kubedistill object, by its kind's script."""
    return run_health_script((health_dir() / f"{obj['kind']}.lua").read_text(), obj)
