"""Training checkpoints in the artifact store: adapter, optimiser, scheduler, RNG and progress, so a
killed train stage resumes where it was (`<base>/train/checkpoints/`, `latest.json` pointing at the
newest complete one; it is written last, so it never names half a checkpoint)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubedistill import store

CHECKPOINTS_KEPT = 2


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0
    tokens: int = 0
    history: list[dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "tokens": self.tokens,
            "history": self.history or [],
        }


def checkpoint_uri(stage_uri: str, step: int) -> str:
    return f"{stage_uri}/checkpoints/step-{step:08d}"


def save_checkpoint(stage_uri: str, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> str:
    """Upload adapter + optimiser + scheduler + RNG, then point latest.json at it (last, so it is complete)."""
    import torch

    uri = checkpoint_uri(stage_uri, state.step)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            Path(tmp) / "trainer_state.pt",
        )
        (Path(tmp) / "state.json").write_text(json.dumps(state.to_json()))
        store.put_tree(tmp, uri)
    previous = _latest(stage_uri)
    store.write_json(f"{stage_uri}/checkpoints/latest.json", {"step": state.step, "uri": uri})
    _prune(stage_uri, keep_from=previous)
    return uri


def _latest(stage_uri: str) -> dict[str, Any] | None:
    try:
        latest: dict[str, Any] = store.read_json(f"{stage_uri}/checkpoints/latest.json")
    except store.NotFound:
        return None
    return latest


def _prune(stage_uri: str, keep_from: dict[str, Any] | None) -> None:
    """Keep the newest CHECKPOINTS_KEPT checkpoints: older ones only cost storage."""
    prefixes = sorted(
        {u.rsplit("/", 1)[0] for u in store.list_uris(f"{stage_uri}/checkpoints/") if "/step-" in u}
    )
    for prefix in prefixes[:-CHECKPOINTS_KEPT]:
        if keep_from is None or prefix != keep_from.get("uri"):
            store.delete_prefix(prefix + "/")


def load_checkpoint(stage_uri: str, model: Any, optimizer: Any, scheduler: Any) -> TrainState | None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    latest = _latest(stage_uri)
    if latest is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        store.get_tree(latest["uri"], tmp)
        set_peft_model_state_dict(model, load_file(str(Path(tmp) / "adapter_model.safetensors")))
        saved = torch.load(Path(tmp) / "trainer_state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        raw = json.loads((Path(tmp) / "state.json").read_text())
    return TrainState(step=raw["step"], elapsed=raw["elapsed"], tokens=raw["tokens"], history=raw["history"])
