"""The embedded default model and its cached export.

`nextn/assets/stdlib-coder/` is a DeepSeek-V3-style checkpoint (10 trunk layers, 2 MTP modules)
trained by `python -m nextn.train` on the Python standard library's source. Every command that takes a
checkpoint or an artifact uses it when none is given; its export lives in the user's cache folder
under a key of the package version and the weights' hash, so a new version re-exports it. What run, bench,
serve and the demo open by default is `embedded_default()`: that export's fp32 trunk with int4 MTP graphs
drafting, calibrated once and cached beside it.
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
    from nextn.export.manifest import GRAPH_FORMS

    h = hashlib.sha256(f"graph forms {GRAPH_FORMS}".encode())  # new export forms: exported afresh
    ckpt = embedded_checkpoint()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update((ckpt / name).read_bytes())
    return f"{EMBEDDED_NAME}-{__version__}-{h.hexdigest()[:12]}"


QUANT_SCHEMES = ("int8", "int4")
DRAFT_SCHEMES = ("int4", "fp32")  # the MTP graphs the embedded model drafts with by default; fp32: as exported


def embedded_quantized(scheme: str, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The embedded model quantized with `nextn calibrate --scheme SCHEME` (its defaults: the stdlib
    training split, a quality report on held-out files), cached beside its fp32 export."""
    from nextn.calib.calibrate import CalibOptions
    from nextn.errors import NextnError

    if scheme not in QUANT_SCHEMES:
        raise NextnError(f"--quant {scheme}: choose one of {', '.join(QUANT_SCHEMES)}")
    return _calibrated(CalibOptions(scheme=scheme, force=True), scheme, progress)


def embedded_default(drafts: str = "int4", progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The embedded model as every command runs it when given no artifact: the fp32 export's trunk as it
    is (so every output is the fp32 model's, token for token) with its MTP graphs' weights in int4
    (`nextn calibrate --scheme fp32 --mtp-scheme int4 --weight-method rtn --head-bits 4`): a draft then costs
    ~0.4x what an fp32 one does, and accepts as often (BENCHMARKS.md, "Drafting that pays"; the 4-bit head,
    60% of a draft's bytes at 8 bits, made drafting steps 3% faster for 2% shorter acceptance: "Experts in
    halves, 4-bit draft heads"). drafts="fp32": the export itself."""
    from nextn.calib.calibrate import CalibOptions
    from nextn.errors import NextnError

    if drafts not in DRAFT_SCHEMES:
        raise NextnError(f"--drafts {drafts}: choose one of {', '.join(DRAFT_SCHEMES)}")
    if drafts == "fp32":
        return embedded_artifact(progress)
    opts = CalibOptions(scheme="fp32", mtp_scheme=drafts, weight_method="rtn", head_bits=4, force=True)
    return _calibrated(opts, f"drafts-{drafts}", progress)


def _calibrated(opts, name: str, progress) -> Path:
    """The fp32 export calibrated with `opts`, once, cached beside it."""
    from nextn.calib.calibrate import calibrate_artifact
    from nextn.export.manifest import MANIFEST

    fp32 = embedded_artifact(progress)
    # the options' digest in the name: a release that changes calibrate's defaults quantizes afresh
    digest = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode()).hexdigest()[:8]
    out = fp32.with_name(f"{fp32.name}-{name}-{digest}")
    if (out / MANIFEST).is_file():
        return out
    log.info("quantizing the embedded model (%s) to %s", name, out)
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
