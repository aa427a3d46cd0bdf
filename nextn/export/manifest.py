"""`manifest.json`: the one description of an exported artifact, and reading it back safely."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from nextn.errors import NextnError
from nextn.model.config import ModelConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# numpy dtype of the arrays fed to / read from a graph of each export dtype (numpy has no bfloat16:
# bf16 graphs exchange float32 arrays with the runtime and validation)
ARRAY_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
FORMAT_VERSION = 2  # 2: MTP graphs take output_rows (1 had no such input)
# Bumped when the export forms (exporter.ExportForms) change the graphs a checkpoint becomes; the embedded
# model's cache key holds it, so a cached export of older forms is not reused. 2: lean attention, fused norms;
# 3: the lean attention reads the past cache where it lies; 4: MTP graphs take output_rows.
GRAPH_FORMS = 5


def sha256_file(path: Path, chunk: int = 1 << 22, progress=None, start: int = 0, total: int = 0) -> str:
    """`progress(what, step, total)` after each chunk, counting bytes from `start` of `total`."""
    h = hashlib.sha256()
    done = start
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            if progress:
                progress(path.name, done + 1, total)  # step counts from 1
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
    `hashed`: entries already computed for files that have not changed since, reused instead of re-read.
    The files' stamps are recorded as verified: this process just hashed (or wrote) them."""
    hashed = hashed or {}
    manifest["files"] = {
        f.name: hashed.get(f.name) or {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST
    }  # fmt: skip
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _record_verified(Path(folder), {n: m["sha256"] for n, m in manifest["files"].items()})


def read_manifest(artifact: str | Path, verify: bool | str = False, progress=None) -> dict[str, Any]:
    """Load an artifact's manifest and check that every file it lists is there with its size.

    verify: False   sizes only
            True    also the sha256 of every file whose stamp (size, mtime, inode) differs from the one
                    recorded on this machine when its sha256 was last computed (by export, calibrate, `nextn
                    verify` or an earlier open): an unchanged artifact opens without reading its weights
            "full"  the sha256 of every file (`nextn verify`, `--verify`)
    `progress(what, step, total)`: called while hashing (bytes)."""
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
    if verify:
        known = _load_verified(root) if verify != "full" else {}
        todo = [n for n, meta in files.items() if known.get(n) != [*_stamp(root / n), meta["sha256"]]]
        total, done = sum(files[n]["bytes"] for n in todo), 0
        for name in todo:
            f = root / name
            if sha256_file(f, progress=progress, start=done, total=total) != files[name]["sha256"]:
                raise NextnError(f"{f}: sha256 mismatch (file changed or corrupt)")
            done += files[name]["bytes"]
        if todo:
            _record_verified(root, {n: files[n]["sha256"] for n in todo})
    return manifest


# -- stamps of verified files, per machine ----------------------------------------------------------
# <cache>/verified/<device>-<folder inode>.json: {file name: [size, mtime_ns, inode, sha256]}. Keyed by the
# folder's identity, not its path, so the rename of a freshly written artifact into place keeps it.


def _stamp(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified_file(root: Path) -> Path:
    from nextn.embedded import cache_root

    st = root.stat()
    return cache_root() / "verified" / f"{st.st_dev}-{st.st_ino}.json"


def _load_verified(root: Path) -> dict[str, list]:
    try:
        return json.loads(_verified_file(root).read_text())
    except (OSError, ValueError):
        return {}


def _record_verified(root: Path, sha: dict[str, str]) -> None:
    """Remember these files as verified at their current stamps (a cache that cannot be written: skipped,
    the next open hashes again)."""
    try:
        path = _verified_file(root)
        doc = {**_load_verified(root), **{n: [*_stamp(root / n), h] for n, h in sha.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not record verified files of %s: %s", root, e)


def manifest_config(manifest: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(manifest["config"])
