"""Read a Hugging Face DeepSeek-V3 checkpoint folder lazily.

Only the safetensors headers are read up front (names, dtypes, shapes, byte ranges); every check that
needs no tensor data happens there, so a bad checkpoint fails before anything is loaded. Tensor data
is memory-mapped copy-on-write: a tensor whose stored dtype is the one asked for is a zero-copy view
of the file's pages, so loading holds about one copy of the weights. FP8 weights are dequantized on
load with their per-block `weight_scale_inv`.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextn.errors import NextnError
from nextn.model.config import ModelConfig, read_config

log = logging.getLogger(__name__)

# safetensors dtype tag -> (numpy dtype of the raw bytes, torch dtype they are viewed as)
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),
    "F8_E4M3": (np.dtype("u1"), torch.float8_e4m3fn),
    "F64": (np.dtype("<f8"), torch.float64),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors tag: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check every byte range lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NextnError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise NextnError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise NextnError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NextnError(f"{path}: corrupt safetensors header") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tag = meta.get("dtype")
        if tag not in _DTYPES:
            raise NextnError(f"{path}: tensor {name} has unsupported dtype {tag}")
        shape = tuple(int(s) for s in meta["shape"])
        start, end = (base + int(o) for o in meta["data_offsets"])
        info = TensorInfo(name, path, tag, shape, start, end)
        if end - start != info.numel * _DTYPES[tag][0].itemsize:
            raise NextnError(f"{path}: tensor {name} byte range does not match shape {list(shape)} {tag}")
        if end > size:
            raise NextnError(f"{path}: truncated safetensors file (tensor {name} ends at byte {end}, file has {size})")
        out[name] = info
    return out


class Checkpoint:
    """A DeepSeek-V3 checkpoint folder: config, tensor index, lazy tensor access.

    `Checkpoint(path)` reads config.json and every safetensors header and validates names and shapes
    against the config; no tensor data is read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config: ModelConfig = read_config(self.path)
        self.tensors: dict[str, TensorInfo] = self._index()
        self._maps: dict[Path, np.memmap] = {}
        from nextn.model.weights import validate_tensors  # names/shapes follow from the config

        # the config as the checkpoint really is (an MTP depth of 0 when its layers were dropped)
        self.config = validate_tensors(self.config, self.tensors)

    # -- files -----------------------------------------------------------------------------------
    @property
    def tokenizer_file(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    def _index(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise NextnError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            headers: dict[str, dict[str, TensorInfo]] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = self.path / shard
                if not shard_path.is_file():
                    raise NextnError(f"{shard_path}: shard listed in {index.name} is missing")
                headers[shard] = read_safetensors_header(shard_path)
            out = {}
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise NextnError(f"{self.path / shard}: tensor {name} listed in {index.name} is not in this shard")
                out[name] = headers[shard][name]
            return out
        if single.is_file():
            return read_safetensors_header(single)
        raise NextnError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    # -- tensor data -----------------------------------------------------------------------------
    def _map(self, file: Path) -> np.memmap:
        # Copy-on-write: views are writable (torch wants that) without ever touching the file.
        m = self._maps.get(file)
        if m is None:
            m = np.memmap(file, dtype=np.uint8, mode="c")
            self._maps[file] = m
        return m

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor, as a zero-copy view of the mapped file where alignment allows."""
        info = self.tensors.get(name)
        if info is None:
            raise NextnError(f"{self.path}: no tensor {name}")
        np_dtype, torch_dtype = _DTYPES[info.dtype]
        buf = self._map(info.file)[info.start : info.end]
        if info.start % np_dtype.itemsize:  # unaligned: numpy can view it, torch cannot
            buf = np.array(buf)
        arr = buf.view(np_dtype).reshape(info.shape)
        return torch.from_numpy(arr).view(torch_dtype)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor in `dtype`, FP8 weights dequantized (weight * scale_inv per block).

        A converted tensor is a fresh allocation; the file pages it was read from are dropped right
        away, so conversion never holds the stored and the converted copy of the whole model at once.
        """
        t = self.raw(name)
        if t.dtype == torch.float8_e4m3fn:
            scale = self.raw(name + "_scale_inv")
            out = dequantize_fp8(t, scale, self.config.quant.block, dtype)
        elif t.dtype == dtype:
            return t
        else:
            out = t.to(dtype)
        self._drop_pages(self.tensors[name])
        return out

    def drop_pages(self, name: str) -> None:
        """Drop the mapped file pages of tensor `name` (its data was copied elsewhere; views re-read them)."""
        self._drop_pages(self.tensors[name])

    def _drop_pages(self, info: TensorInfo) -> None:
        m = self._maps.get(info.file)
        if m is None or m._mmap is None:
            return
        lo = (info.start // mmap.PAGESIZE + 1) * mmap.PAGESIZE  # whole pages inside this tensor only:
        hi = info.end // mmap.PAGESIZE * mmap.PAGESIZE  # its neighbours may be zero-copy views
        if hi > lo:
            m._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # private, never written: re-read on access

    def same_data(self, a: str, b: str) -> bool:
        """Whether tensors a and b hold identical values (compared on the mapped bytes, nothing copied).

        a's pages are dropped afterwards: it is the candidate duplicate (an MTP module's copy of the
        embedding or head), which the caller keeps only when it differs.
        """
        ta, tb = self.raw(a), self.raw(b)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            same = False
        elif a + "_scale_inv" in self.tensors or b + "_scale_inv" in self.tensors:
            same = torch.equal(self.get(a, torch.float32), self.get(b, torch.float32))
        else:
            same = torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))
        self._drop_pages(self.tensors[a])
        return same

    def release(self) -> None:
        """Drop this reader's own file maps (tensors already handed out keep theirs alive)."""
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def names_by_file(self) -> Iterator[tuple[Path, list[str]]]:
        """Tensor names grouped by file, in file order (one shard mapped at a time when loading)."""
        by_file: dict[Path, list[str]] = {}
        for info in sorted(self.tensors.values(), key=lambda i: (str(i.file), i.start)):
            by_file.setdefault(info.file, []).append(info.name)
        yield from by_file.items()


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[N, K] e4m3 weight * [ceil(N/bn), ceil(K/bk)] fp32 scales (edge blocks partial) -> [N, K] `dtype`.

    The product is taken in fp32 one column block at a time, so the only full-size allocation is the
    result (large fp32 temporaries would fragment the heap and inflate peak RSS).
    """
    n, k = weight.shape
    bn, bk = block
    out = torch.empty(n, k, dtype=dtype)
    rows = scale_inv.float().repeat_interleave(bn, dim=0)[:n]  # [N, ceil(K/bk)]
    for j in range(rows.shape[1]):
        cols = slice(j * bk, (j + 1) * bk)
        out[:, cols] = weight[:, cols].float() * rows[:, j : j + 1]  # [N, bk] fp32 -> dtype
    return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize [N, K] to e4m3 the way DeepSeek does: scale = amax / 448 per block.

    Returns (weight_fp8 [N, K], scale_inv [ceil(N/bn), ceil(K/bk)] fp32) with
    dequantize_fp8(*quantize_fp8(w)) ~= w.
    """
    n, k = weight.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    w = torch.zeros(gn * bn, gk * bk, dtype=torch.float32)
    w[:n, :k] = weight.float()
    blocks = w.view(gn, bn, gk, bk)  # [gn, bn, gk, bk]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [gn, gk]
    scale = amax / torch.finfo(torch.float8_e4m3fn).max  # [gn, gk]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(gn * bn, gk * bk)[:n, :k]
    return q.contiguous(), scale
