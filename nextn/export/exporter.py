"""`nextn export`: a checkpoint folder in, a validated artifact folder out.

    checkpoint ─ load_model (dtype, attention form) ─┬─ TrunkGraph ─ torch.onnx.export ─ trunk.onnx ─┐
                                                     └─ MtpGraph k ─ torch.onnx.export ─ mtp_k.onnx ─┴─ pack_weights ─ weights.bin
    validate every graph in ONNX Runtime against the reference ─ manifest.json ─ move into place

Everything is written to a temporary folder beside the output and renamed into place only after
validation passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nextn.errors import NextnError
from nextn.export import fused_moe, fused_rope, latent_attention, lean_attention
from nextn.export.graphs import MtpGraph, TrunkGraph, dynamic_shapes, example_inputs, mtp_io, trunk_io
from nextn.export.manifest import FORMAT_VERSION, tool_versions, write_manifest
from nextn.export.validate import check_cases, fp32_twin, make_session, reference_cases
from nextn.export.stream import DeferredWeights, StreamedWeights, materialize, weight_bytes
from nextn.export.writer import pack_weights, save_graph, trace_graph
from nextn.model.checkpoint import Checkpoint
from nextn.model.weights import load_model, mtp_prefix, partial_model, skeleton, trim_heap

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPSETS = range(18, 24)
FULL_VALIDATION_BYTES = 1 << 30  # above this, a streamed export validates a truncated trunk
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    mtp_layers: int | None = None  # None: every MTP module the checkpoint has
    opset: int = 23
    attention: str = "absorbed"  # absorbed | naive (see BENCHMARKS.md for the measurement behind the default)
    moe: str = "auto"  # auto | fused | sparse (fused_moe.py; auto: fused where the config allows it)
    force: bool = False
    stream: bool = True  # trace on the meta device, write weights a layer at a time (stream.py)
    validation: str = "auto"  # auto | full | truncated (below; auto: full up to FULL_VALIDATION_BYTES)


Progress = Callable[[str, int, int], None]  # (what, step, total steps)


def export_checkpoint(checkpoint: str | Path, out: str | Path, opts: ExportOptions, progress: Progress | None = None,
                      deferred: DeferredWeights | None = None) -> dict:  # fmt: skip
    """Export `checkpoint` to the artifact folder `out`; return the manifest.

    `deferred` (`nextn export --quantize`): the graphs are written without their large weights, which stay
    in the checkpoint until the quantizing rewrite reads them through `deferred`; no weights.bin, and the
    graphs are validated on a truncated twin (nothing could run the deferred ones)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_options(opts, out)
    if deferred is not None and (not opts.stream or opts.validation == "full"):
        raise NextnError("--quantize: the fp32 graphs are never written whole, so their validation is truncated "
                         "(the quality report checks the whole quantized model); drop --validation full")  # fmt: skip
    cfg = Checkpoint(checkpoint).config  # reads headers only: bad checkpoints fail here
    n_mtp = cfg.num_nextn_predict_layers if opts.mtp_layers is None else opts.mtp_layers
    if n_mtp > cfg.num_nextn_predict_layers:
        raise NextnError(f"--mtp-layers {n_mtp}: {checkpoint} has {cfg.num_nextn_predict_layers} MTP module(s)")
    if cfg.num_nextn_predict_layers == 0:
        log.warning("%s has no MTP modules: exporting the trunk alone (no drafting possible)", checkpoint)

    dtype = DTYPE_NAMES[opts.dtype]  # checked by _check_options
    moe = fused_moe.resolve_moe_form(opts.moe, cfg, dtype)
    graphs = ["trunk"] + [f"mtp_{k}" for k in range(n_mtp)]
    total = 3 + 2 * len(graphs) + 1
    step = Steps(progress, total)
    forms = ExportForms(moe, opts.opset)
    if opts.stream:
        step("read checkpoint structure")
        ckpt = Checkpoint(checkpoint)
        model, private = skeleton(ckpt, n_mtp, opts.attention == "absorbed", DTYPES[opts.dtype])
        weights = StreamedWeights(ckpt, model, private, DTYPES[opts.dtype], forms)
        unique_bytes = weight_bytes(model, DTYPES[opts.dtype])
    else:
        step("load checkpoint")
        model, cfg = load_model(checkpoint, dtype=DTYPES[opts.dtype], mtp_layers=n_mtp,
                                absorbed=opts.attention == "absorbed", stack_experts=forms.stack_experts)  # fmt: skip
        weights = None
        unique_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    if deferred is None:
        _check_disk(out, unique_bytes, extra=n_mtp * 2 * cfg.vocab_size * cfg.hidden_size * DTYPES[opts.dtype].itemsize)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        io = {}
        for name in graphs:
            step(f"export {name}.onnx")
            io[name] = _export_one(model, cfg, name, opts, dtype, forms, weights, tmp / f"{name}.onnx", deferred)
        export_s = time.perf_counter() - t0
        if weights is not None:
            log.info("streamed: %d checkpoint group loads", weights.loads)
            weights.unload()
        scope = "truncated" if deferred is not None else _validation_scope(opts, unique_bytes)
        step(f"compute reference outputs ({scope} validation)")
        if scope == "full":
            if weights is not None:
                model, _ = load_model(checkpoint, dtype=DTYPES[opts.dtype], mtp_layers=n_mtp,
                                      absorbed=opts.attention == "absorbed")  # fmt: skip
            # Reference outputs first, then release the model: validation never holds the reference's
            # weights and an ONNX Runtime session's at once. A 16-bit export is checked against its own
            # weights computed in fp32.
            ref = model if opts.dtype == "fp32" else model.float()
            cases = {name: reference_cases(name, ref, dtype) for name in graphs}
            runs = {name: tmp / f"{name}.onnx" for name in graphs}
            del ref
        else:
            cases, runs = _truncated_references(weights.ckpt, n_mtp, opts, dtype, forms, tmp / ".twin")
            if deferred is not None:  # the MTP graphs run whole: with their weights, written for the check
                runs |= {g: materialize(runs[g], deferred, tmp / ".twin" / f"{g}.onnx") for g in graphs if g != "trunk"}
        model = weights = None
        gc.collect()
        trim_heap()
        step("pack shared weights")
        if deferred is None:
            packed = pack_weights([tmp / f"{g}.onnx" for g in graphs], tmp / "weights.bin")
        else:
            packed = {"bytes": deferred.end, "deferred": DeferredWeights.LOCATION}  # never written
        validation = []
        for name in graphs:
            step(f"validate {name}.onnx in ONNX Runtime")
            src = fp32_twin(runs[name]) if dtype == "bfloat16" else runs[name]
            validation += check_cases(make_session(src), cases[name], dtype)
        shutil.rmtree(tmp / ".twin", ignore_errors=True)
        bad = [r for r in validation if not r["max_abs"] <= r["bound"]]
        if bad:
            r = bad[0]
            raise NextnError(
                f"validation failed: {r['graph']} {r['output']} at batch {r['batch']}, new {r['new_tokens']}, "
                f"past {r['past_len']}: max abs error {r['max_abs']:.3g} > {r['bound']:.3g}; nothing written to {out}"
            )

        step("write manifest")
        for f in COPIED:
            if (checkpoint / f).is_file():
                shutil.copyfile(checkpoint / f, tmp / f)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(checkpoint.resolve()),
            "dtype": dtype,
            "opset": opts.opset,
            "attention": opts.attention,
            "moe": moe,
            "config": cfg.to_dict() | {"num_nextn_predict_layers": n_mtp},
            "eos_token_ids": list(cfg.eos_token_ids),
            "tokenizer": "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            "graphs": {
                name: {
                    "file": f"{name}.onnx",
                    "inputs": [s.to_dict() for s in io[name][0]],
                    "outputs": [s.to_dict() for s in io[name][1]],
                }
                for name in graphs
            },
            "weights": {"file": "weights.bin", "unique_weight_bytes": unique_bytes, **packed},
            "validation": validation,
            "validation_scope": scope if scope == "full" else
            f"truncated: trunk graph of layers 0-{truncated_layers(cfg) - 1} of {cfg.num_hidden_layers}, MTP graphs whole",
            "export_seconds": round(export_s, 2),
            "tools": tool_versions(),
        }
        write_manifest(tmp, manifest)
        move_into_place(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ExportForms:
    """The export-only forms of the MoE, the rotary and the absorbed attention (validated like everything
    else; lean_attention.py, at the rotary's opset and up): `forms(model)`
    enters them on `model`; `translations()` maps their custom ops to ONNX."""

    moe: str  # fused | sparse (resolved)
    opset: int

    @property
    def onnxruntime_ops(self) -> bool:  # the fused MoE needs ONNX Runtime: its other contrib ops may go in too
        return self.moe == "fused"

    @property
    def stack_experts(self) -> bool:  # the fused MoE reads the experts from stacks the loader can fill
        return self.moe == "fused"

    @property
    def one_node_attention(self) -> bool:  # latent_attention.py: where the graph needs ONNX Runtime anyway
        return self.onnxruntime_ops and self.opset >= fused_rope.ROPE_OPSET

    def translations(self) -> dict:
        return (fused_moe.onnx_translations() if self.moe == "fused" else {}) | (
            fused_rope.onnx_translations() if self.opset >= fused_rope.ROPE_OPSET else {}) | (
            latent_attention.onnx_translations() if self.one_node_attention else {})  # fmt: skip

    @contextlib.contextmanager
    def __call__(self, model):
        with contextlib.ExitStack() as stack:
            if self.moe == "fused":
                stack.enter_context(fused_moe.fused_experts(model))
            if self.opset >= fused_rope.ROPE_OPSET:
                stack.enter_context(fused_rope.fused_rope(model))
                stack.enter_context(lean_attention.lean_attention(model, self.one_node_attention))  # absorbed only
            yield


def _export_one(model, cfg, name: str, opts: ExportOptions, dtype: str, forms: ExportForms, weights, path: Path,
                deferred: DeferredWeights | None = None):  # fmt: skip
    """Trace graph `name` inside the export forms and save it; returns its (inputs, outputs) specs.

    A model holding its weights is saved inside the forms (its tensors are the forms' values); a meta
    skeleton is saved after them, while `weights` loads each group inside forms of its own."""
    if name == "trunk":
        module, (inputs, outputs), which = TrunkGraph(model), trunk_io(cfg, dtype), "trunk"
    else:
        module, (inputs, outputs), which = MtpGraph(model, int(name[4:])), mtp_io(cfg, dtype), "mtp"
    example = example_inputs(cfg, DTYPES[opts.dtype], which, b=2, s=3, p=4)
    if weights is not None:
        weights.unload()
        example = tuple(t.to("meta") if isinstance(t, torch.Tensor) else tuple(x.to("meta") for x in t) for t in example)
    with forms(model):
        program = trace_graph(module, example, dynamic_shapes(which, cfg.num_hidden_layers), inputs, outputs,
                              opts.opset, forms.translations())  # fmt: skip
        if weights is None:
            save_graph(program, inputs, outputs, path, onnxruntime_ops=forms.onnxruntime_ops)
    if weights is not None:
        save_graph(program, inputs, outputs, path, weights, deferred, onnxruntime_ops=forms.onnxruntime_ops)
    return inputs, outputs


def _validation_scope(opts: ExportOptions, unique_bytes: int) -> str:
    """A whole-model export validates in full (it holds the model anyway); a streamed one up to
    FULL_VALIDATION_BYTES of weights, and above that on a truncated trunk (_truncated_references)."""
    if not opts.stream or opts.validation == "full":
        return "full"
    if opts.validation == "truncated":
        return "truncated"
    return "full" if unique_bytes <= FULL_VALIDATION_BYTES else "truncated"


def truncated_layers(cfg) -> int:
    """Layers of the truncated trunk: a dense and an MoE layer where the model has both."""
    return min(cfg.num_hidden_layers, cfg.first_k_dense_replace + 1)


def _truncated_references(ckpt: Checkpoint, n_mtp: int, opts: ExportOptions, dtype: str, forms: ExportForms,
                          scratch: Path) -> tuple[dict, dict]:  # fmt: skip
    """Validation without the whole model: (reference cases, graph file to run) per graph.

    The trunk: a twin of the first `truncated_layers` layers is exported the same streamed way into
    `scratch` and checked against a reference holding only those layers. It checks the graph's form
    on real weights (every op, fused form and dtype path the full trunk has); the full trunk's other
    layers are the same code writing other tensors (streamed = whole-model export, bit for bit: tested).
    Each MTP graph runs whole, against a reference holding the embedding, head, final norm and its own
    block, on random hidden states through the trunk's final norm.
    """
    cfg, absorbed, torch_dtype = ckpt.config, opts.attention == "absorbed", DTYPES[opts.dtype]
    twin = copy.copy(ckpt)
    twin.config = dataclasses.replace(cfg, num_hidden_layers=truncated_layers(cfg), num_nextn_predict_layers=0)
    model, private = skeleton(twin, 0, absorbed, torch_dtype)
    weights = StreamedWeights(twin, model, private, torch_dtype, forms)
    scratch.mkdir()
    _export_one(model, twin.config, "trunk", opts, dtype, forms, weights, scratch / "trunk.onnx")
    weights.unload()
    ref = partial_model(twin, 0, absorbed, torch_dtype).float()
    cases, runs = {"trunk": reference_cases("trunk", ref, dtype)}, {"trunk": scratch / "trunk.onnx"}
    for case in cases["trunk"]:
        case.graph = f"trunk[:{twin.config.num_hidden_layers}]"
    top = {n for n in ckpt.tensors if not n.startswith("model.layers.")}
    for k in range(n_mtp):
        del ref  # one reference at a time
        trim_heap()
        prefix = mtp_prefix(cfg, k)
        ref = partial_model(ckpt, k + 1, absorbed, torch_dtype, keep=lambda n: n in top or n.startswith(prefix)).float()
        cases[f"mtp_{k}"] = reference_cases(f"mtp_{k}", ref, dtype, trunk_hidden=False)
        runs[f"mtp_{k}"] = scratch.parent / f"mtp_{k}.onnx"
    ckpt.release()
    return cases, runs


class Steps:
    """Numbered progress steps: logged (with memory use) and passed to an optional progress callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.n = progress, total, 0

    def __call__(self, what: str) -> None:
        self.n += 1
        log.info("[%d/%d] %s (RSS %s, peak %s)", self.n, self.total, what, *_rss())
        if self.progress is not None:
            self.progress(what, self.n, self.total)


def _rss() -> tuple[str, str]:
    """Current and peak resident memory of this process, for the progress log."""
    found = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line.split(":")[0]] = f"{int(line.split()[1]) / 2**20:.2f} GiB"
    except OSError:
        pass
    return found.get("VmRSS", "?"), found.get("VmHWM", "?")


def _check_options(opts: ExportOptions, out: Path) -> None:
    if opts.dtype not in DTYPES:
        raise NextnError(f"--dtype {opts.dtype}: choose one of {', '.join(DTYPES)}")
    if opts.opset not in OPSETS:
        raise NextnError(f"--opset {opts.opset}: nextn exports opsets {OPSETS.start} to {OPSETS.stop - 1}")
    if opts.attention not in ("absorbed", "naive"):
        raise NextnError(f"--attention {opts.attention}: choose absorbed or naive")
    if opts.validation not in ("auto", "full", "truncated"):
        raise NextnError(f"--validation {opts.validation}: choose auto, full or truncated")
    if opts.mtp_layers is not None and opts.mtp_layers < 0:
        raise NextnError(f"--mtp-layers {opts.mtp_layers}: must be >= 0")
    check_output(out, opts.force)


def check_output(out: Path, force: bool) -> None:
    """An output folder may be new, empty, or replaced with --force: anything else is refused up front."""
    if out.exists() and not out.is_dir():
        raise NextnError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NextnError(f"{out}: folder exists and is not empty (use --force to replace it)")


def _check_disk(out: Path, unique_bytes: int, extra: int) -> None:
    """Before packing, each graph's own .data holds its weights (`extra`: the shared embedding and head
    once more per MTP graph); packing then writes weights.bin beside them."""
    need = 2 * unique_bytes + extra + (64 << 20)
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise NextnError(f"{probe}: {free / 2**30:.2f} GiB free, the export needs about {need / 2**30:.2f} GiB")


def move_into_place(tmp: Path, out: Path) -> None:
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary folder
    if out.exists():  # --force (or an empty folder): swap, then delete the old one
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
