"""Streaming export: graphs traced without weights, weights written one group of layers at a time.

The whole-model export holds every weight (and the exporter's folded copies) at once. Here memory is
bounded by one group of checkpoint tensors (a decoder layer, an MTP module, or embedding + norm + head):

1. trace: the model is built on the meta device (`weights.skeleton`: shapes, no data) and exported
   with meta inputs, inside the same export forms (fused MoE, fused rope) as the whole-model export.
   The graph is the one the real model gives (the tests compare node for node and byte for byte).
2. optimize on stand-ins: onnxscript's constant folding reads values. Every initializer of at most
   FOLD_INPUT_LIMIT elements gets its real value: only those can be folded together with anything.
   Every larger one gets a stand-in: a numpy view, at its own offset, into one anonymous mapping that
   is never written (address space, no memory). The only fold that takes larger inputs is Transpose
   (onnxscript's always-fold op), which numpy does as a view; so every large initializer of the
   optimized graph is still a view into the mapping, and its address and strides say which weight it
   came from and how it was permuted.
3. write: each large initializer becomes a lazy tensor. Saving the graph asks for them in graph
   order; `StreamedWeights` loads the group that holds the asked-for tensor (the same loader and
   export forms as the whole-model export), applies the stand-in view's strides to the real values,
   and drops the group when another one is asked for. The checkpoint's file pages are released with it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo
import onnx_ir as ir
import torch
from torch import nn
from torch.onnx._internal.exporter._core import TorchTensor  # torch is pinned: the exporter's own tensor

from nextn.errors import NextnError
from nextn.export.optimize import FOLD_INPUT_LIMIT
from nextn.export.writer import point_to
from nextn.model.reference import Rotary
from nextn.model.weights import FP32_SUFFIXES, layer_groups, load_tensors, share, unload, wanted_names

log = logging.getLogger(__name__)

GRAPH_PREFIX = "model."  # TrunkGraph / MtpGraph hold the model as `.model`: initializer names start so


class StreamedWeights:
    """Real values for the initializers of graphs traced on `model` (the meta skeleton), a group of
    checkpoint tensors at a time.

    `forms` (exporter.ExportForms) are the export forms the trace ran inside: values are read with them
    entered on the model, as the whole-model export reads them.
    """

    def __init__(self, ckpt, model, private, dtype: torch.dtype, forms):
        self.ckpt, self.model, self.dtype, self.forms = ckpt, model, dtype, forms
        self.stack = forms.stack_experts
        self.private = private
        self.layers = ckpt.config.num_hidden_layers
        self.groups = layer_groups(wanted_names(ckpt, len(model.mtp), private))
        canonical = {id(p): n for n, p in model.named_parameters()}
        self.alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        self.meta_rotary, self.rotary = Rotary(ckpt.config).to("meta"), Rotary(ckpt.config)
        self.current: object = None
        self.tensors: dict[str, torch.Tensor] = {}  # the current group's model tensors by name
        self.open = contextlib.ExitStack()
        self.small: dict[str, torch.Tensor] | None = None
        self.loads = 0  # groups loaded (a group is loaded again when the graph order comes back to it)

    # -- groups -------------------------------------------------------------------------------------
    def _group(self, fqn: str) -> object:
        """The checkpoint group holding model tensor `fqn`: its layer's index (an MTP module's is
        num_hidden_layers + k), or "top" (embedding, final norm, head)."""
        parts = self.alias.get(fqn, fqn).split(".")
        if parts[:2] == ["model", "layers"]:
            return int(parts[2])
        if parts[0] == "mtp":
            return self.layers + int(parts[1])
        return "top"

    def unload(self) -> None:
        """Every parameter back on the meta device (the state a trace needs)."""
        self.open.close()
        unload(self.model)
        share(self.model, self.private)
        self.model.rotary = self.meta_rotary
        self.ckpt.release()  # the file maps go with the views: their pages leave this process
        self.current, self.tensors = None, {}  # (the group's tensors must not outlive it: two would be held)

    def _load(self, group: object, names: list[str]) -> dict[str, torch.Tensor]:
        """Load `names` into the skeleton, enter the export forms; the model's tensors by name."""
        self.unload()
        load_tensors(self.model, self.ckpt, names, self.dtype, self.stack)
        share(self.model, self.private)
        self.model.rotary = self.rotary
        self.open.enter_context(self.forms(self.model))
        self.current, self.loads = group, self.loads + 1
        return {**dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False))}  # fmt: skip

    def value(self, fqn: str) -> torch.Tensor:
        """The real value of model tensor `fqn` as the export forms make it (loads its group)."""
        group = self._group(fqn)
        if group != self.current:
            self.tensors = self._load(group, self.groups.get(group, []))
        t = self.tensors.get(fqn)
        if t is None or t.is_meta:
            raise NextnError(f"streaming export: no data for {fqn} in checkpoint group {group}")
        return t

    def small_values(self) -> dict[str, torch.Tensor]:
        """Copies of every model tensor of at most FOLD_INPUT_LIMIT elements (all of them load at once:
        norms, biases, small routers), as the export forms make them."""
        if self.small is None:
            names = [n for ns in self.groups.values() for n in ns if self.ckpt.tensors[n].numel <= FOLD_INPUT_LIMIT]
            tensors = self._load("small", names)
            self.small = {n: t.detach().clone() for n, t in tensors.items()
                          if not t.is_meta and t.numel() <= FOLD_INPUT_LIMIT}  # fmt: skip
            self.unload()
        return self.small

    # -- one graph ----------------------------------------------------------------------------------
    def stand_in(self, model: ir.Model) -> StandIns:
        """Give a traced graph's initializers values for optimization: small ones real, large ones views
        into an unwritten mapping. Returns the mapping, which `bind` reads back after optimization."""
        small = self.small_values()
        large = []
        for name, value in model.graph.initializers.items():
            raw = getattr(value.const_value, "raw", None)
            if not isinstance(raw, torch.Tensor) or not raw.is_meta:
                continue  # a constant of the trace itself: it has its data
            fqn = name.removeprefix(GRAPH_PREFIX)
            if raw.numel() <= FOLD_INPUT_LIMIT:
                if fqn not in small:
                    raise NextnError(f"streaming export: no data for {fqn}")
                value.const_value = TorchTensor(small[fqn], name=name)
            else:
                large.append((value, fqn, raw))
        stand_ins = StandIns(sum(-(-r.numel() * r.element_size() // 64) * 64 for _, _, r in large))
        for value, fqn, raw in large:
            value.const_value = ir.Tensor(stand_ins.add(fqn, raw), name=value.name)
        return stand_ins

    def bind(self, model: ir.Model, stand_ins: StandIns, deferred: DeferredWeights | None = None) -> None:
        """After optimization: every large initializer becomes a lazy tensor over the real weights, or with
        `deferred`, a reference into its never-written file (read from the checkpoint when asked)."""
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if isinstance(tensor, TorchTensor) or tensor is None or tensor.size <= FOLD_INPUT_LIMIT:
                continue
            view = stand_ins.find(tensor.numpy())
            if view is None:
                raise NextnError(f"streaming export: initializer {name} was computed from weights during "
                                 f"optimization by an op streaming cannot replay")  # fmt: skip
            if deferred is None:
                value.const_value = ir.LazyTensor(self._reader(*view), dtype=tensor.dtype, shape=tensor.shape, name=name)
            else:
                nbytes = int(tensor.nbytes)
                offset = deferred.add(view, self._reader(*view), nbytes, self)
                value.const_value = ir.ExternalTensor(deferred.LOCATION, offset, nbytes, tensor.dtype,
                                                      shape=tensor.shape, name=name)  # fmt: skip
        stand_ins.close()

    def _reader(self, fqn: str, offset: int, shape: tuple, strides: tuple) -> Callable[[], ir.TensorProtocol]:
        def read() -> ir.TensorProtocol:
            real = self.value(fqn)
            out = torch.as_strided(real, shape, strides, real.storage_offset() + offset).contiguous()
            return TorchTensor(out)

        return read


class DeferredWeights:
    """The large weights of graphs saved without them (`nextn export --quantize`: no fp32 artifact on disk).

    Each is an external-data reference into LOCATION, a file that is never written, at an offset of its
    own; `raw(offset, length)` computes its bytes from the checkpoint when the quantizing rewrite asks
    (StreamedWeights: a group of layers loaded at a time, as the export writes them)."""

    LOCATION = "weights.deferred"

    def __init__(self):
        self.readers: dict[int, Callable[[], ir.TensorProtocol]] = {}
        self.offsets: dict[tuple, int] = {}
        self.end = 0  # the bytes the weights would take, each distinct one once (the embedding and head are shared)
        self.sources: list[StreamedWeights] = []

    def add(self, key: tuple, read: Callable[[], ir.TensorProtocol], nbytes: int, source: StreamedWeights) -> int:
        """The offset of the weight `key` (its checkpoint view), `read` its reader."""
        if key not in self.offsets:
            self.offsets[key], self.end = self.end, self.end + -(-nbytes // 64) * 64
            self.readers[self.offsets[key]] = read
        if source not in self.sources:
            self.sources.append(source)
        return self.offsets[key]

    def release(self) -> None:
        """Drop the checkpoint group the last read loaded (it is loaded again if asked for)."""
        for source in self.sources:
            source.unload()

    def array(self, offset: int, length: int) -> np.ndarray:
        """The weight at `offset` as a read-only array, without a copy where the checkpoint group's tensor
        is already in the graph's layout (a fused MoE's expert stack is a third of a layer)."""
        data = self.readers[offset]().numpy()
        if data.nbytes != length:
            raise NextnError(f"deferred weights: {length} bytes expected at {offset}, the checkpoint gave {data.nbytes}")
        data = data.view()
        data.flags.writeable = False
        return data

    def raw(self, offset: int, length: int) -> bytes:
        return self.array(offset, length).tobytes()


def materialize(graph: Path, deferred: DeferredWeights, dst: Path) -> Path:
    """A copy at `dst` of a graph saved with deferred weights, its weights written to `dst`.data (what
    validation runs: one MTP graph, never the trunk)."""
    model = onnx.load(str(graph), load_external_data=False)
    with open(dst.parent / f"{dst.name}.data", "wb") as out:
        for t in model.graph.initializer:
            info = ExternalDataInfo(t) if t.data_location == onnx.TensorProto.EXTERNAL else None
            if info is None or info.location != deferred.LOCATION:
                continue
            out.write(b"\0" * (-out.tell() % 64))
            offset = out.tell()
            out.write(deferred.raw(info.offset, info.length))
            point_to(t, f"{dst.name}.data", offset, info.length)
    onnx.save(model, str(dst))
    return dst


class StandIns:
    """Views into one anonymous read-only mapping that is never written: tensors with shapes, dtypes and
    addresses but no memory. A view derived from one (by Transpose, Reshape, Slice) is traced back to
    its tensor by address, and to the element layout by its strides."""

    def __init__(self, nbytes: int):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            self.map = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=flags, prot=mmap.PROT_READ)
        except OSError as e:
            raise NextnError(f"streaming export: cannot reserve {nbytes / 2**30:.1f} GiB of address space ({e})") from None
        self.buffer = np.frombuffer(self.map, dtype=np.uint8)
        self.base = self.buffer.__array_interface__["data"][0]
        self.starts: list[int] = []
        self.spans: list[tuple[int, str, int, int]] = []  # (start, fqn, nbytes, itemsize)
        self.used = 0

    def add(self, fqn: str, like: torch.Tensor) -> np.ndarray:
        itemsize, nbytes = like.element_size(), like.numel() * like.element_size()
        np_dtype = ir.DataType(TorchTensor(torch.empty(0, dtype=like.dtype)).dtype).numpy()
        view = self.buffer[self.used : self.used + nbytes].view(np_dtype).reshape(tuple(like.shape))
        self.starts.append(self.base + self.used)
        self.spans.append((self.base + self.used, fqn, nbytes, itemsize))
        self.used += -(-nbytes // 64) * 64
        return view

    def find(self, array: np.ndarray) -> tuple[str, int, tuple, tuple] | None:
        """(fqn, element offset, shape, element strides) of a view into one stand-in, else None."""
        addr = array.__array_interface__["data"][0]
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return None
        start, fqn, nbytes, itemsize = self.spans[i]
        if not addr < start + max(nbytes, 1) or array.itemsize != itemsize:
            return None
        strides = tuple(s // itemsize for s in array.strides)
        return fqn, (addr - start) // itemsize, tuple(array.shape), strides

    def close(self) -> None:
        self.buffer = None
        self.starts, self.spans = [], []  # the mapping goes when the last view does


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's distinct parameters at `dtype` (routers fp32), from shapes alone."""
    total = 0
    for name, p in model.named_parameters():
        itemsize = 4 if name.endswith(FP32_SUFFIXES) else dtype.itemsize
        total += p.numel() * itemsize
    return total
