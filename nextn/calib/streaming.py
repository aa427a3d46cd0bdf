"""Quantizing a graph one tensor at a time, so memory is bounded by a tensor, not by the graph.

`nextn calibrate` used to load a graph with all its weights, quantize every linear, then save: peak
RSS about 2.8x the fp32 weights. For the weight-only schemes (int4 MatMulNBits and QMoE, and a graph
kept fp32) the rewrite now reads each weight when its node is rewritten (`TensorReader`: one read from
the file its initializer names), quantizes it (`LazyMap`: computed when asked, not kept), and moves
each new tensor's data to the output's .data file as soon as it is made (`Spill`). `save_streamed` then
writes the graph as `onnx.save_model(..., save_as_external_data=True, size_threshold=1024)` lays it out
after loading every tensor: the same proto (which tensors are external, their order and names), with
the untouched tensors copied one at a time. `pack_weights` reads the data back the same way either way,
so weights.bin is the same bytes (tests/calib/test_calibrate.py compares both paths).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from nextn.export.writer import point_to

SIZE_THRESHOLD = 1024  # onnx.save_model's: tensors whose raw_data object is this large go external


class TensorReader:
    """An initializer's data as an array, read alone: inline from the proto, external with one read."""

    def __init__(self, folder: Path, deferred=None):
        self.folder, self.deferred = folder, deferred  # deferred: export.stream.DeferredWeights
        self.fds: dict[str, int] = {}

    def raw(self, t: onnx.TensorProto) -> bytes:
        info = ExternalDataInfo(t)
        if self.deferred is not None and info.location == self.deferred.LOCATION:
            return self.deferred.raw(info.offset, info.length)
        fd = self.fds.get(info.location)
        if fd is None:
            fd = self.fds[info.location] = os.open(self.folder / info.location, os.O_RDONLY)
        return os.pread(fd, info.length, info.offset or 0)

    def __call__(self, t: onnx.TensorProto) -> np.ndarray:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = ExternalDataInfo(t)
        if self.deferred is not None and info.location == self.deferred.LOCATION:
            return self.deferred.array(info.offset, info.length)  # no bytes or proto copies in between
        inline = onnx.TensorProto()
        inline.CopyFrom(t)  # no data in it: the copy is the header
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = self.raw(t)
        return numpy_helper.to_array(inline)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Spill:
    """Moves a tensor's data to the end of `path` (the output graph's .data) when it is large enough
    for onnx.save_model to store it externally; small ones stay inline."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")

    def __call__(self, t: onnx.TensorProto) -> onnx.TensorProto:
        if not t.HasField("raw_data") or sys.getsizeof(t.raw_data) < SIZE_THRESHOLD:
            return t
        offset = self.file.tell()
        self.file.write(t.raw_data)
        t.ClearField("raw_data")
        point_to(t, self.path.name, offset, self.file.tell() - offset)
        return t

    def close(self) -> None:
        self.file.close()


class LazyMap(Mapping):
    """A mapping over `keys` whose values `compute(key)` makes when asked; nothing is kept."""

    def __init__(self, keys: Iterable[str], compute: Callable[[str], object]):
        self.keys_, self.compute = list(keys), compute

    def __getitem__(self, key: str):
        if key not in self.keys_:
            raise KeyError(key)
        return self.compute(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def save_streamed(model: onnx.ModelProto, dst: Path, read: TensorReader, spill: Spill) -> None:
    """Save `model` to `dst` with its large tensors in `spill`'s file: tensors still in their source
    file are copied there one at a time (or inlined when small, as onnx.save_model would after loading)."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and ExternalDataInfo(t).location != spill.path.name:
            raw = read.raw(t)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
        spill(t)
    spill.close()
    read.close()
    onnx.save(model, str(dst))
