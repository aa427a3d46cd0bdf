"""The embedded default model and its cached export.

`nextn/assets/stdlib-coder/` is a DeepSeek-V3-style checkpoint (10 trunk layers, 2 MTP modules)
trained by `python -m nextn.train` on the Python standard library's source. Every command that takes a
checkpoint or an artifact uses it when none is given; its export lives in the user's cache folder
under a key of the package version and the weights' hash, so a new version re-exports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

EMBEDDED_NAME = "stdlib-coder"


def embedded_checkpoint() -> Path:
    return Path(__file__).parent / "assets" / EMBEDDED_NAME


def cache_root() -> Path:
    """$NEXTN_CACHE, else $XDG_CACHE_HOME/nextn, else ~/.cache/nextn."""
    if os.environ.get("NEXTN_CACHE"):
        return Path(os.environ["NEXTN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nextn"


def _cache_key() -> str:
    from nextn import __version__

    h = hashlib.sha256()
    ckpt = embedded_checkpoint()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update((ckpt / name).read_bytes())
    return f"{EMBEDDED_NAME}-{__version__}-{h.hexdigest()[:12]}"


QUANT_SCHEMES = ("int8", "int4")


def embedded_quantized(scheme: str, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The embedded model quantized with `nextn calibrate --scheme SCHEME` (its defaults: the stdlib
    training split, a quality report on held-out files), cached beside its fp32 export."""
    from nextn.calib.calibrate import CalibOptions, calibrate_artifact
    from nextn.errors import NextnError
    from nextn.export.manifest import MANIFEST

    if scheme not in QUANT_SCHEMES:
        raise NextnError(f"--quant {scheme}: choose one of {', '.join(QUANT_SCHEMES)}")
    fp32 = embedded_artifact(progress)
    opts = CalibOptions(scheme=scheme, force=True)
    # the options' digest in the name: a release that changes calibrate's defaults quantizes afresh
    digest = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode()).hexdigest()[:8]
    out = fp32.with_name(f"{fp32.name}-{scheme}-{digest}")
    if (out / MANIFEST).is_file():
        return out
    log.info("quantizing the embedded model (%s) to %s", scheme, out)
    calibrate_artifact(fp32, out, [], [], opts, progress)
    return out


def embedded_artifact(progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Path of the embedded model's fp32 export, exporting it first when the cache has none."""
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.export.manifest import MANIFEST

    out = cache_root() / "artifacts" / _cache_key()
    if (out / MANIFEST).is_file():
        return out
    log.info("exporting the embedded model to %s", out)
    export_checkpoint(embedded_checkpoint(), out, ExportOptions(force=True), progress)
    return out
