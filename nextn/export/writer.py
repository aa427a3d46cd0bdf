"""torch -> ONNX for one graph, then all graphs' weights packed into one shared external-data file.

Each graph is exported with `torch.onnx.export(dynamo=True)`, optimized (optimize.py: constant
folding, rewrites, standard-op fusions) and saved to its own .onnx + .data pair. `pack_weights` then streams every graph's external
tensors into one `weights.bin`, storing each distinct tensor (by content) once, and points the graphs'
initializers at it. Tensors of 64 KiB or more are page-aligned so ONNX Runtime can memory-map them:
sessions of different graphs then share the physical pages of the embedding and head.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import onnx_ir
import torch
from onnx.external_data_helper import ExternalDataInfo

from nextn.export.graphs import BATCH, NEW, PAST, ROWS, TOTAL, TensorSpec
from nextn.export.latent_attention import attach_function
from nextn.export.optimize import optimize_graph

log = logging.getLogger(__name__)

PAGE = 4096
SMALL = 64 * 1024  # below this, 64-byte alignment (padding every small tensor to a page would bloat files)


def export_graph(module: torch.nn.Module, example: tuple, dynamic_shapes: tuple, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], path: Path, opset: int, translations: dict | None = None) -> None:
    """Trace and save one graph of a model that holds its weights."""
    save_graph(trace_graph(module, example, dynamic_shapes, inputs, outputs, opset, translations), inputs, outputs, path)


def trace_graph(
    module: torch.nn.Module,
    example: tuple,
    dynamic_shapes: tuple,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    opset: int,
    translations: dict | None = None,
):
    """torch.export + torch.onnx of `module` with named I/O; `translations` maps custom torch ops to
    their ONNX form (fused_moe.py). Returns the ONNXProgram, not yet optimized."""
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            example,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            opset_version=opset,
            custom_translation_table=translations,
            optimize=False,  # our own pipeline below: the stock one has a quadratic rule
            verbose=False,
        )


def save_graph(program, inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path, weights=None,
               deferred=None, onnxruntime_ops: bool = False) -> None:  # fmt: skip
    """Optimize a traced graph and save it to `path` (+ `path`.data) with readable symbolic dimensions.
    `weights` (a stream.StreamedWeights) when the graph was traced on the meta device: its initializers
    get stand-ins for optimization and are read from the checkpoint while saving; with `deferred`
    (stream.DeferredWeights) the large ones are not read at all: the graph is saved referring to them.
    `onnxruntime_ops`: the graph may take ONNX Runtime's contrib ops (optimize.fuse_skip_norms)."""
    stand_ins = weights.stand_in(program.model) if weights is not None else None
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        optimize_graph(program.model, onnxruntime_ops=onnxruntime_ops)
    if weights is not None:
        weights.bind(program.model, stand_ins, deferred)
    if deferred is not None:
        onnx_ir.save(program.model, str(path))  # external tensors stay references; the small ones inline
    else:
        program.save(str(path), external_data=True)
    program.release()
    model = onnx.load(str(path), load_external_data=False)
    attach_function(model)  # the MlaAttention nodes' body (latent_attention.py), after the optimizer's inlining
    _name_dims(model, inputs, outputs)
    _strip_debug_metadata(model)
    onnx.save(model, str(path))


def _strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node provenance (FX node text, stack traces): ~85% of the graph file."""
    for item in [*model.graph.node, *model.graph.value_info, *model.graph.input, *model.graph.output,
                 *model.graph.initializer]:  # fmt: skip
        del item.metadata_props[:]


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines to stdout and warns that torchvision is absent; library
    code must not print, and nothing here uses torchvision."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        registration.setLevel(level)


def _name_dims(model: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Replace the exporter's symbols (s10, s43 + s70, ...) by batch, new_tokens, past_len, total_len, output_rows."""
    rename: dict[str, str] = {}
    specs = {s.name: s for s in [*inputs, *outputs]}
    for value in [*model.graph.input, *model.graph.output]:
        spec = specs[value.name]
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and dim.HasField("dim_param"):
                rename.setdefault(dim.dim_param, want)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    assert set(rename.values()) <= {BATCH, NEW, PAST, TOTAL, ROWS}, rename


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external-data reference to `length` bytes at `offset` of the file `location`."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def pack_weights(graphs: list[Path], weights: Path) -> dict:
    """Move the external tensors of `graphs` into one file, each distinct tensor once.

    Returns {"bytes": size of weights.bin, "tensors": stored, "references": initializers pointing in,
    "shared": names of tensors used by more than one graph}.
    """
    stored: dict[str, tuple[int, int]] = {}  # content digest -> (offset, length)
    users: dict[str, set[int]] = {}
    first_name: dict[str, str] = {}
    references = 0
    with open(weights, "wb") as out:
        for gi, path in enumerate(graphs):
            model = onnx.load(str(path), load_external_data=False)
            data_dir = path.parent
            handles: dict[str, object] = {}
            for tensor in model.graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = ExternalDataInfo(tensor)
                src = handles.get(info.location)
                if src is None:
                    src = handles[info.location] = open(data_dir / info.location, "rb")
                src.seek(info.offset or 0)
                blob = src.read(info.length)
                digest = hashlib.sha256(blob).hexdigest() + f":{tensor.data_type}"
                if digest not in stored:
                    align = PAGE if len(blob) >= SMALL else 64
                    pos = out.tell()
                    pad = -pos % align
                    out.write(b"\0" * pad)
                    stored[digest] = (pos + pad, len(blob))
                    out.write(blob)
                    first_name[digest] = tensor.name
                users.setdefault(digest, set()).add(gi)
                point_to(tensor, weights.name, *stored[digest])
                references += 1
            for h in handles.values():
                h.close()
            for location in handles:
                os.remove(data_dir / location)
            onnx.save(model, str(path))
        size = out.tell()
    shared = sorted(first_name[d] for d, g in users.items() if len(g) > 1)
    return {"bytes": size, "tensors": len(stored), "references": references, "shared": shared}
