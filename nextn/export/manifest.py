"""`manifest.json`: the one description of an exported artifact, and reading it back safely."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nextn.errors import NextnError
from nextn.model.config import ModelConfig

MANIFEST = "manifest.json"

# numpy dtype of the arrays fed to / read from a graph of each export dtype (numpy has no bfloat16:
# bf16 graphs exchange float32 arrays with the runtime and validation)
ARRAY_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import platform

    import onnx
    import onnxruntime
    import onnxscript
    import torch

    import nextn

    return {
        "nextn": nextn.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def write_manifest(folder: Path, manifest: dict[str, Any], hashed: dict[str, dict] | None = None) -> None:
    """Record every file of `folder` (size, sha256) in `manifest["files"]` and write manifest.json there.
    `hashed`: entries already computed for files that have not changed since, reused instead of re-read."""
    hashed = hashed or {}
    manifest["files"] = {
        f.name: hashed.get(f.name) or {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST
    }  # fmt: skip
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(artifact: str | Path, verify: bool = False) -> dict[str, Any]:
    """Load an artifact's manifest; with `verify`, check every file's size and sha256."""
    root = Path(artifact)
    path = root / MANIFEST
    if not root.is_dir():
        raise NextnError(f"{root}: not an artifact folder")
    if not path.is_file():
        raise NextnError(f"{path}: missing (not a nextn artifact; `nextn export` writes one)")
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format_version"]
        files = manifest["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise NextnError(f"{path}: corrupt manifest") from None
    if version != FORMAT_VERSION:
        raise NextnError(f"{path}: format_version {version} is not {FORMAT_VERSION}; re-export with this nextn")
    for name, meta in files.items():
        f = root / name
        if not f.is_file():
            raise NextnError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != meta["bytes"]:
            raise NextnError(f"{f}: size {f.stat().st_size} differs from the manifest's {meta['bytes']}")
        if verify and sha256_file(f) != meta["sha256"]:
            raise NextnError(f"{f}: sha256 mismatch (file changed or corrupt)")
    return manifest


def manifest_config(manifest: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(manifest["config"])
