"""Engines: one exported graph behind a tiny interface, per backend.

    with open_engines(artifact, backend="ort") as engines:
        logits, hidden, *new_kv = engines["trunk"].run({"input_ids": ..., ...})

Every engine takes and returns numpy arrays named as in the manifest, so the decoder never knows
which backend runs a graph. Backends:
  ort    ONNX Runtime on the artifact's graphs (CPUExecutionProvider; CUDA / TensorRT providers when
         onnxruntime-gpu is installed and device="cuda").
  torch  the PyTorch reference modules with the same interface, loaded from the checkpoint the artifact
         was exported from (the manifest's `source`), on CPU or CUDA.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextn.errors import NextnError
from nextn.export.manifest import read_manifest
from nextn.runtime import huge_pages

log = logging.getLogger(__name__)

BACKENDS = ("ort", "torch")
DEVICES = ("cpu", "cuda")


class Engine(abc.ABC):
    """One graph: named inputs in, outputs (in the manifest's order) out."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str]):
        self.name, self.inputs, self.outputs = name, inputs, outputs

    @abc.abstractmethod
    def run(self, feed: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Run on `feed`; outputs named in `out` are written into those (contiguous) arrays in place."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SharedWeights:
    """weights.bin memory-mapped once for all of an artifact's sessions.

    Every external initializer is handed to ONNX Runtime as an OrtValue over the mapping
    (`SessionOptions.add_initializer`), so a tensor several graphs use (embedding, head) is in memory
    once, pages load on first use, and nothing is copied. ONNX Runtime's weight pre-packing makes a
    private packed copy per session, so it is off unless asked for (`prepack`; BENCHMARKS.md measures both);
    while sessions pre-pack, `dropping_pages` keeps the originals from staying resident beside the copies.
    """

    _NP = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_, 2: np.uint8, 3: np.int8}

    def __init__(self, path: Path):
        # Read-only and shared with the page cache: nothing can write to the weights, so dropping this
        # process's pages (drop_pages) can never lose data; a later read maps them again.
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.map = np.frombuffer(self._mm, dtype=np.uint8)
        self.values: dict[tuple[int, int, int], tuple] = {}  # (offset, length, type) -> (array, OrtValue)
        self._graphs: dict[Path, dict[str, tuple]] = {}  # graph -> entries(graph)

    def drop_pages(self) -> None:
        """Unmap the mapping's resident pages from this process (they stay in the page cache)."""
        self._mm.madvise(mmap.MADV_DONTNEED)

    @contextlib.contextmanager
    def dropping_pages(self, interval_s: float = 0.02):
        """Drop the mapping's pages every `interval_s` while the body runs, and once after.

        For opening sessions that pre-pack: ONNX Runtime reads each weight once to build its packed copy
        and never reads the original again, but the pages it read would stay resident in this process
        beside the copies, twice the weights at the peak (2.32 GB for a 1.25 GB int4 artifact). Session
        creation releases the GIL, so a thread can drop them as they are read (peak 1.35 GB). Weights no
        kernel packs (the embedding, norms) are simply read again, once, on first use."""
        stop = threading.Event()

        def loop():
            while not stop.wait(interval_s):
                self.drop_pages()

        thread = threading.Thread(target=loop, name="nextn-drop-pages", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.drop_pages()

    def add_to(self, so, graph: Path, replaced: dict | None = None, only: set[str] | None = None) -> None:
        """Hand `graph`'s external initializers to the session options; `replaced` (name -> OrtValue, which
        the caller keeps alive with its array as long as the session lives) instead of the mapping's; `only`:
        just these names (those a rewritten graph still reads)."""
        for name, (_, value) in self.entries(graph).items():
            if only is None or name in only:
                so.add_initializer(name, (replaced or {}).get(name, value))

    def entries(self, graph: Path) -> dict[str, tuple]:
        """name -> (view of the mapping, OrtValue over it) for each external initializer of `graph`."""
        if graph not in self._graphs:
            self._graphs[graph] = self._read_entries(graph)
        return self._graphs[graph]

    def _read_entries(self, graph: Path) -> dict[str, tuple]:
        import onnx
        import onnxruntime as ort
        from onnx.external_data_helper import ExternalDataInfo

        model = onnx.load(str(graph), load_external_data=False)
        out = {}
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in self._NP:
                continue  # other types (bf16) are left to ONNX Runtime's own loader
            info = ExternalDataInfo(t)
            key = (info.offset, info.length, t.data_type)
            if key not in self.values:  # the array is kept: the OrtValue only borrows its memory
                view = self.map[info.offset : info.offset + info.length].view(self._NP[t.data_type])
                view = view.reshape(tuple(t.dims))
                self.values[key] = (view, ort.OrtValue.ortvalue_from_numpy(view))
            out[t.name] = self.values[key]
        return out


class OrtEngine(Engine):
    def __init__(self, name, inputs, outputs, path: Path, device: str, threads: int,
                 shared: SharedWeights | None = None, prepack: bool = False, load_forms: bool = False):  # fmt: skip
        super().__init__(name, inputs, outputs)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        model: str | bytes = str(path)
        self.halves: dict[str, tuple] = {}  # name -> (array, OrtValue): the session borrows them, kept as long
        self.merged = 0  # groups of sibling products merged (merged_matmuls.py)
        self.routed_experts = 0  # MoE nodes on nextn's kernel (routed_experts.py)
        self.attention_kernels = 0  # attention layers on nextn's kernel (latent_attention.py)
        self.bf16_matmuls = 0  # products of bf16 weights on nextn's kernel (bf16_matmul.py)
        self.int8_matmuls = 0  # int8 Q/DQ linears on nextn's kernel (int8_matmul.py)
        self.nbits_matmuls = 0  # MatMulNBits on nextn's kernel (nbits_matmul.py)
        self.mtp_module = None  # the whole graph on nextn's kernel: its mtp_module.PackedModule
        if shared is not None and device == "cpu":
            kept = None
            if load_forms:
                forms = _load_forms(path, shared)
                model, kept, self.merged = forms.model, forms.kept, forms.merged
                self.routed_experts, self.attention_kernels = forms.routed_experts, forms.attention
                self.bf16_matmuls, self.int8_matmuls = forms.bf16_matmuls, forms.int8_matmuls
                self.nbits_matmuls = forms.nbits_matmuls
                self.mtp_module = forms.mtp_module
                self.halves = {n: (a, ort.OrtValue.ortvalue_from_numpy(a)) for n, a in forms.stacks.items()}
                if forms.library:
                    so.register_custom_ops_library(str(forms.library))
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            shared.add_to(so, path, {n: v for n, (_, v) in self.halves.items()}, kept)
        self.shared = shared  # the session borrows the mapping's memory: keep it alive as long
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise NextnError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(model, so, providers=providers)

    def run(self, feed, out=None):
        # A plain run over the caller's arrays (ONNX Runtime wraps contiguous numpy inputs without a copy),
        # then the outputs named in `out` are copied into place. Measured faster than IOBinding here: binding
        # ~40 cache tensors per call cost more (~0.15 ms on the embedded trunk) than copying the S new
        # entries per layer (BENCHMARKS.md, "Drafting that pays").
        values = self.session.run(None, feed)
        if any(v is None for v in values):  # ONNX Runtime returns None for an output a custom kernel left unset
            raise NextnError(f"{self.name}: nextn's kernel refused this call (shapes, rows or token ids out of range)")
        if out:
            for i, name in enumerate(self.outputs):
                if name in out:
                    out[name][...] = values[i]
                    values[i] = out[name]
        return values

    def close(self):
        self.session = None


@dataclass
class LoadForms:
    """A graph as a pre-packing session takes it (_load_forms)."""

    model: bytes | str  # the rewritten graph, serialized; the file's path when nothing applied
    stacks: dict[str, np.ndarray]  # initializers laid out anew (same names; new dims, bf16 ones in half the bytes)
    merged: int  # groups of sibling products merged
    kept: set[str] | None  # the initializers the graph still reads (None: all)
    library: Path | None = None  # nextn's kernel library, where nodes run on it (to register)
    routed_experts: int = 0  # MoE / QMoE nodes now nextn.RoutedExperts(Bf16) / QRoutedExperts
    attention: int = 0  # MlaAttention nodes now nextn.LatentAttention(Bf16)
    bf16_matmuls: int = 0  # MatMul nodes now nextn.Bf16MatMul
    int8_matmuls: int = 0  # int8 Q/DQ MatMuls now nextn.Int8MatMul
    nbits_matmuls: int = 0  # MatMulNBits now nextn.NBitsMatMul
    mtp_module: object = None  # mtp_module.PackedModule: the whole (int4 MTP) graph now one nextn.MtpModule node


def _load_forms(path: Path, shared: SharedWeights) -> LoadForms:
    """The graph at `path` in the forms that suit the CPU: an int4 MTP graph as one node on nextn's kernel
    (mtp_module.py), or, where a C compiler built nextn's kernels, the attention, the routed experts (fp32, bf16,
    4- and 8-bit) and int8 Q/DQ linears on them (latent_attention.py, routed_experts.py, int8_matmul.py); the other
    routed experts in halves for ONNX Runtime's threads (expert_halves.py), sibling products merged
    (merged_matmuls.py), then products whose weights are bf16 values and MatMulNBits on nextn's kernels
    (bf16_matmul.py, nbits_matmul.py)."""
    import onnx

    from nextn.export.latent_attention import OP_TYPE as ATTENTION_FUNCTION
    from nextn.runtime import bf16_matmul, int8_matmul, latent_attention, mtp_module, nbits_matmul, routed_experts
    from nextn.runtime.expert_halves import halve_experts
    from nextn.runtime.merged_matmuls import merge_sibling_matmuls
    from nextn.runtime.native import DOMAIN, kernel_library

    model = onnx.load(str(path), load_external_data=False)
    stored = {t.name: t for t in model.graph.initializer}

    def read(name: str) -> np.ndarray:  # the mapping's view, or a small tensor stored in the graph itself
        mapped = shared.entries(path).get(name)
        return mapped[0] if mapped else onnx.numpy_helper.to_array(stored[name], str(path.parent))

    wanted = any(n.op_type in ("MoE", "QMoE", "MatMul", "MatMulNBits", ATTENTION_FUNCTION) for n in model.graph.node)
    library = kernel_library() if wanted else None
    packed = mtp_module.use_mtp_module(model, read) if library else None
    if packed:
        return LoadForms(model.SerializeToString(), {}, 0, {t.name for t in model.graph.initializer}, library,
                         mtp_module=packed)  # fmt: skip
    stacks = {**routed_experts.use_routed_experts(model, read), **routed_experts.use_quantized_experts(model, read),
              **latent_attention.use_latent_attention(model, read),
              **int8_matmul.use_int8_matmul(model, read)} if library else {}  # fmt: skip
    stacks.update(halve_experts(model, read))
    merged = merge_sibling_matmuls(model, read)
    stored.update({t.name: t for t in model.graph.initializer})  # the merged products' weights, in the graph
    stacks.update(bf16_matmul.use_bf16_matmul(model, read) if library else {})
    stacks.update(nbits_matmul.use_nbits_matmul(model, read) if library else {})
    on_kernel = [n.op_type for n in model.graph.node if n.domain == DOMAIN and n.op_type != ATTENTION_FUNCTION]
    experts = sum(t in routed_experts.OP_TYPES for t in on_kernel)
    attention = sum(t in (latent_attention.OP_TYPE, latent_attention.OP_TYPE_BF16) for t in on_kernel)
    stored.update({t.name: t for t in model.graph.initializer})  # rewrites that drop initializers copy the rest
    inline = [n for n in stacks if stored[n].data_location != onnx.TensorProto.EXTERNAL]
    for name in inline:  # a small stack stored in the graph: its new layout goes there too (the mapping has none)
        stored[name].CopyFrom(onnx.numpy_helper.from_array(stacks.pop(name), name))
    if not stacks and not inline and not merged and not on_kernel:
        return LoadForms(str(path), {}, 0, None)
    kept = {t.name for t in model.graph.initializer}
    return LoadForms(model.SerializeToString(), stacks, merged, kept, library if on_kernel else None, experts,
                     attention, on_kernel.count(bf16_matmul.OP_TYPE), on_kernel.count(int8_matmul.OP_TYPE),
                     on_kernel.count(nbits_matmul.OP_TYPE))  # fmt: skip


class TorchEngine(Engine):
    def __init__(self, name, inputs, outputs, module, device: str, dtype):
        super().__init__(name, inputs, outputs)
        self.module, self.device, self.dtype = module, device, dtype

    def run(self, feed, out=None):
        import torch

        args = []
        for n in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            if self.name == "trunk":
                result = self.module(args[0], args[1], args[2], tuple(args[3:]))
            else:
                result = self.module(*args)
        # numpy has no bfloat16: those come back as float32 (the decoder's caches then are float32 too)
        arrays = [(t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for t in result]
        for i, name in enumerate(self.outputs):
            if out and name in out:
                out[name][...] = arrays[i]
                arrays[i] = out[name]
        return arrays


class Engines(dict):
    """The artifact's engines by graph name, closed together."""

    def __init__(self, manifest: dict, engines: dict[str, Engine], setup: dict | None = None):
        super().__init__(engines)
        self.manifest = manifest
        self.setup = setup  # backend, device, threads, pre-packing: what step costs depend on

    def close(self) -> None:
        for e in self.values():
            e.close()

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Intra-op threads of the MTP graphs' sessions, whatever `threads` the trunk gets. A draft is one decoder layer
# and a head: its ops are too small to split, and each session has its own pool, so a second multi-thread pool
# spinning beside the trunk's oversubscribes the cores. On 2 cores with both at 2 threads, K = 3 took 2.4 ms a
# token against 1.24 ms for plain decoding (auto 0.77x); trunk 2 + drafts 1 made plain decoding and drafting
# both 7% faster than 1 + 1 (benchmarks/draft_threads.py, BENCHMARKS.md).
DRAFT_THREADS = 1

# The graph rewrites a pre-packing session applies when it opens (_load_forms), numbered: step costs measured
# with other forms (the costs cache, keyed by `setup`) are measured again. 1: experts in halves, siblings merged;
# 2: fp32 routed experts on nextn's kernel; 3: the attention on nextn's kernel; 4: int4 MTP graphs as one node;
# 5: a step's drafts in one call of it (mtp_module.NativeDrafter); 6: bf16 weights' products on nextn's kernel;
# 7: large routed experts in column blocks; 8: 4- and 8-bit routed experts (QMoE) on nextn's kernel; 9: int8 Q/DQ
# linears on nextn's kernel; 10: MatMulNBits on nextn's kernel; 11: the sessions' new memory on huge pages
# (huge_pages.py); 12: bf16 products' column blocks of 96 (bf16_matmul.py).
LOAD_FORMS = 12

# Pre-packing keeps a second, per-session copy of the weights: worth it (BENCHMARKS.md: up to 1.4x per
# decode step on small models) while that copy is a small share of the machine's memory.
PREPACK_MAX_RAM_FRACTION = 1 / 8
# ... and a quantized artifact's MatMulNBits / QMoE need it: unpacked, ONNX Runtime dequantizes every weight
# at every call (the 1 GB int4 trunk: 432 ms a token against 10 ms; int8 1.85x slower). The packed copy
# replaces the mapping's pages (dropping_pages), so up to half of memory it is still about one copy.
QUANTIZED_PREPACK_MAX_RAM_FRACTION = 1 / 2


def auto_prepack(weight_bytes: int, quantized: bool = False) -> bool:
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return weight_bytes <= ram * (QUANTIZED_PREPACK_MAX_RAM_FRACTION if quantized else PREPACK_MAX_RAM_FRACTION)


def open_engines(
    artifact: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0, verify: bool | str = True,
    prepack: bool | None = None,
) -> Engines:
    """Open every graph of an artifact with one backend. `threads`: intra-op threads of the trunk (0: the
    backend's default); ONNX Runtime runs the MTP graphs on DRAFT_THREADS. `verify`: see manifest.read_manifest
    (True: the sha256 of files changed since last verified on this machine; "full": of every file); `prepack`
    lets ONNX Runtime keep its own pre-packed copy of the weights per session (faster, more memory);
    None (auto): pre-pack when the weights take at most PREPACK_MAX_RAM_FRACTION of physical memory (a
    quantized artifact: QUANTIZED_PREPACK_MAX_RAM_FRACTION, since it is 40x slower unpacked). The
    sessions that pre-pack also take their graphs in the layouts that suit ONNX Runtime's threads (routed
    experts in halves, sibling products merged: private copies too; _load_forms)."""
    if backend not in BACKENDS:
        raise NextnError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise NextnError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if threads < 0:
        raise NextnError(f"--threads {threads}: must be >= 0 (0: the backend's default)")
    root = Path(artifact)
    manifest = read_manifest(root, verify=verify)
    graphs = manifest["graphs"]
    io = {n: ([s["name"] for s in g["inputs"]], [s["name"] for s in g["outputs"]]) for n, g in graphs.items()}
    if backend == "ort":
        quantized = bool(manifest.get("quantization"))
        if prepack is None:
            prepack = auto_prepack(manifest["weights"]["bytes"], quantized)
        if quantized and not prepack:
            log.warning("%s: a quantized artifact without pre-packing runs its quantized products ~40x slower "
                        "(ONNX Runtime dequantizes every weight at every call)", root)
        shared = SharedWeights(root / manifest["weights"]["file"])
        on_cpu = prepack and device == "cpu"
        with (shared.dropping_pages() if on_cpu else contextlib.nullcontext(),
              huge_pages.collapsing_new_memory() if on_cpu else contextlib.nullcontext()):  # fmt: skip
            engines = {n: OrtEngine(n, *io[n], root / g["file"], device, threads if n == "trunk" else DRAFT_THREADS,
                                    shared, prepack, load_forms=prepack)
                       for n, g in graphs.items()}  # fmt: skip
        setup = {"backend": backend, "device": device, "threads": threads, "draft_threads": DRAFT_THREADS,
                 "prepack": prepack, "load_forms": LOAD_FORMS if prepack else 0}  # fmt: skip
        return Engines(manifest, engines, setup)

    if manifest.get("quantization"):
        raise NextnError(f"--backend torch: {root} is a quantized artifact; the torch backend runs the fp32 "
                         "reference weights (use --backend ort)")  # fmt: skip
    import torch

    from nextn.export.graphs import MtpGraph, TrunkGraph
    from nextn.model.weights import load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise NextnError("--device cuda: no CUDA device is available to torch")
    if threads:
        torch.set_num_threads(threads)
    source = Path(manifest["source"])
    if not (source / "config.json").is_file():
        raise NextnError(f"--backend torch: the artifact's source checkpoint {source} is not there")
    dtype = getattr(torch, manifest["dtype"])
    n_mtp = manifest["config"]["num_nextn_predict_layers"]
    model, _ = load_model(source, dtype=dtype, mtp_layers=n_mtp, absorbed=manifest["attention"] == "absorbed")
    model = model.to(device)
    engines = {"trunk": TorchEngine("trunk", *io["trunk"], TrunkGraph(model), device, dtype)}
    for k in range(n_mtp):
        engines[f"mtp_{k}"] = TorchEngine(f"mtp_{k}", *io[f"mtp_{k}"], MtpGraph(model, k), device, dtype)
    return Engines(manifest, engines, {"backend": backend, "device": device, "threads": threads})
