"""The export stage: merge the LoRA adapter, save safetensors, convert to GGUF, quantise, prove it loads.

In:  `<base>/train/adapter/` and the student (`spec.student.model`).
Out: `<base>/export/merged/` (safetensors + tokenizer), `<base>/export/gguf/model-<quant>.gguf` for
     each of `spec.export.quantizations`, each loaded by llama.cpp and made to generate a few tokens
     before the stage reports it.

The GGUF conversion is llama.cpp's own `convert_hf_to_gguf.py` with its own `gguf-py` (PyPI's
`gguf` lags the converter), taken from the llama-cpp-python sdist at install time (DESIGN §6) and
found in env KUBEDISTILL_LLAMA_CPP_DIR, else `<cache>/llama.cpp-<version>`. Quantisation is
`llama_cpp.llama_model_quantize`, the same library that later serves the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubedistill import store
from kubedistill.api.models import Artifacts, Metrics, Stage
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill_trainer import models
from kubedistill_trainer.runtime import ProgressReporter, StageFailure

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DIR_ENV = "KUBEDISTILL_LLAMA_CPP_DIR"
# llama.h's enum llama_ftype.
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}
SMOKE_TOKENS = 4
CONVERT_TIMEOUT_S = 3600


def converter_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(LLAMA_CPP_DIR_ENV):
        return Path(env[LLAMA_CPP_DIR_ENV])
    cache = Path(env.get("KUBEDISTILL_CACHE") or Path.home() / ".cache" / "kubedistill")
    return cache / f"llama.cpp-{LLAMA_CPP_VERSION}"


def _converter_script(directory: Path) -> Path:
    script = directory / "convert_hf_to_gguf.py"
    if not script.is_file() or not (directory / "gguf-py").is_dir():
        raise StageFailure(
            "ConverterMissing",
            f"llama.cpp's converter is not at {script} (with gguf-py/ beside it): run scripts/bootstrap.sh, "
            f"or set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout",
        )
    return script


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def merge_adapter(inv: StageInvocation, adapter_dir: Path, out: Path) -> None:
    """Base + adapter → one dense model (safetensors) with the tokenizer the converter needs."""
    import torch
    from peft import PeftModel

    source = models.resolve_student(inv.spec.student.model)
    # fp32 on CPU keeps the merge exact; GPUs merge in bf16 to fit larger students.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = models.load_causal_lm(source, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    models.load_tokenizer(source).save_pretrained(str(out))
    _copy_sentencepiece_model(source, out)


def _copy_sentencepiece_model(source: models.StudentSource, out: Path) -> None:
    """transformers 5 saves tokenizer.json only; the converter reads a SentencePiece vocab from tokenizer.model."""
    local = Path(source.path) / "tokenizer.model"
    if local.is_file():
        shutil.copyfile(local, out / "tokenizer.model")
        return
    if Path(source.path).exists():
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    # Absent for BPE tokenizers, whose tokenizer.json is what the converter reads.
    with contextlib.suppress(EntryNotFoundError):
        shutil.copyfile(hf_hub_download(source.path, "tokenizer.model"), out / "tokenizer.model")


def convert_to_gguf(merged: Path, out: Path, converter: Path, outtype: str) -> None:
    script = _converter_script(converter)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(merged), "--outfile", str(out), "--outtype", outtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=CONVERT_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise StageFailure("GGUFConversionFailed", f"convert_hf_to_gguf.py exited {proc.returncode}: {tail}")


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise StageFailure(
            "LlamaCppMissing", f"llama-cpp-python is not installed (the gguf extra): {exc}"
        ) from exc
    return llama_cpp


def quantize(src: Path, dst: Path, quant: str) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise StageFailure("QuantizationFailed", f"llama_model_quantize to {quant} returned {rc}")


def smoke_test(path: Path) -> list[int]:
    """Load the GGUF with llama.cpp and generate a few tokens (EOS or not): proof the file is usable."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=os.cpu_count() or 1, verbose=False)
    try:
        tokens: list[int] = []
        for token in llm.generate(llm.tokenize(b"Hello"), temp=0.0):
            tokens.append(int(token))
            if len(tokens) == SMOKE_TOKENS:
                break
        return tokens
    finally:
        llm.close()


def _outtype(merged: Path) -> str:
    import json

    dtype = json.loads((merged / "config.json").read_text()).get("dtype") or ""
    # bf16 weights can overflow f16; everything else converts to f16, which every quantiser takes.
    return "bf16" if "bfloat16" in str(dtype) else "f16"


def run(inv: StageInvocation) -> StageResult:
    spec = inv.spec.export
    stage_uri = inv.stage_uri()
    adapter_uri = f"{inv.stage_uri(Stage.TRAIN)}/adapter"
    if not store.exists(f"{adapter_uri}/adapter_config.json"):
        raise StageFailure("MissingInput", f"no adapter at {adapter_uri}: run train first")
    if spec.gguf:  # fail before the slow merge when the toolchain is missing
        _converter_script(converter_dir())
        _llama_cpp()
    total = 2 + (len(spec.quantizations) if spec.gguf else 0)
    progress = ProgressReporter(stage_uri, Stage.EXPORT)

    ggufs: dict[str, str] = {}
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        progress.update(0, total, detail="merging the adapter", force=True)
        store.get_tree(adapter_uri, tmp / "adapter")
        merge_adapter(inv, tmp / "adapter", tmp / "merged")
        merged_uri = f"{stage_uri}/merged"
        store.put_tree(tmp / "merged", merged_uri)
        if spec.gguf:
            progress.update(1, total, detail="converting to GGUF", force=True)
            outtype = _outtype(tmp / "merged")
            full = tmp / f"model-{outtype}.gguf"
            convert_to_gguf(tmp / "merged", full, converter_dir(), outtype)
            details["ggufSourceType"] = outtype
            for done, quant in enumerate(spec.quantizations, start=2):
                progress.update(done, total, detail=f"quantising to {quant}", force=True)
                path = tmp / f"model-{quant}.gguf"
                quantize(full, path, quant)
                sample = smoke_test(path)
                uri = f"{stage_uri}/gguf/{path.name}"
                store.put_file(path, uri)
                ggufs[quant] = uri
                details[quant] = {
                    "uri": uri,
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "smokeTokens": len(sample),
                }
        progress.update(total, total, detail="done", force=True)
    return StageResult(
        stage=Stage.EXPORT,
        ok=True,
        message=f"merged; GGUF {', '.join(ggufs) or 'not requested'}",
        metrics=Metrics(),
        artifacts=Artifacts(merged_uri=merged_uri, gguf_uris=ggufs or None),
        details=details,
    )
