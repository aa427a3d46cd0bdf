"""Matrices of 4- or 8-bit blockwise weights, read from ONNX Runtime's layouts (MatMulNBits, QMoE) and packed for
nextn's VNNI products (`kernels/qmm.h`), which nextn.MtpModule and nextn.QRoutedExperts run on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 16  # columns per tile of a packed matrix (qmm.h's TILE)


@dataclass
class BlockMatrix:
    """W [K, N] of 4- or 8-bit values: W = (q - zero) scale, per block of `block` rows and per column."""

    q: np.ndarray  # [N, K] uint8, 0 .. 2^bits - 1
    scale: np.ndarray  # [N, blocks] fp32
    zero: np.ndarray  # [N, blocks] fp32
    block: int
    bits: int = 4

    @property
    def k(self) -> int:
        return self.q.shape[1]

    @property
    def n(self) -> int:
        return self.q.shape[0]

    def dequantize(self) -> np.ndarray:
        """W [K, N] fp32."""
        blocks = np.arange(self.k) // self.block
        return ((self.q.astype(np.float32) - self.zero[:, blocks]) * self.scale[:, blocks]).T

    def columns(self, order: np.ndarray) -> BlockMatrix:
        return BlockMatrix(self.q[order], self.scale[order], self.zero[order], self.block, self.bits)


def from_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, block: int,
               bits: int = 4) -> BlockMatrix:  # fmt: skip
    """MatMulNBits' (and each QMoE expert's) layout -> BlockMatrix: B [N, blocks, block bits / 8] (4 bits: element
    2j in the low nibble), scales [N blocks], zero points [N ceil(blocks bits / 8)] (4 bits: two per byte; none:
    the middle of the range)."""
    blocks = -(-k // block)
    b = b.reshape(n, blocks * block * bits // 8)
    if bits == 4:
        q = np.empty((n, blocks * block), np.uint8)
        q[:, 0::2], q[:, 1::2] = b & 15, b >> 4
    else:
        q = b
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.uint8)
    elif bits == 4:
        zp = zero_points.reshape(n, -1)
        zero = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zero = zero_points.reshape(n, blocks)
    return BlockMatrix(np.ascontiguousarray(q[:, :k]), scales.reshape(n, blocks).astype(np.float32),
                       zero.astype(np.float32), block, bits)  # fmt: skip


def pack_matrix(m: BlockMatrix) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's layout, for VNNI's 4-way int8 products: bytes [tiles, K / 8, 16, 4] at 4 bits (byte (c, j)
    of a group of 8 rows k: column 16t + c at row k + j in its low nibble, at k + 4 + j in its high one), [tiles,
    K / 4, 16, 4] at 8 bits (byte (c, j): column 16t + c at row 4g + j); and floats [tiles, blocks, 32] (16
    scales, then 16 zero * scale); columns past N are zeros."""
    tiles = -(-m.n // TILE)
    pad = ((0, tiles * TILE - m.n), (0, 0))
    if m.bits == 4:
        q = np.pad(m.q, pad).reshape(tiles, TILE, m.k // 8, 2, 4)  # [tiles, c, group, half, j]
        data = np.ascontiguousarray((q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(0, 2, 1, 3)).reshape(-1)
    else:
        data = byte_tiles(m.q)
    scale = np.pad(m.scale, pad)
    zs = (np.pad(m.zero, pad) * scale).astype(np.float32)
    floats = np.stack([scale.reshape(tiles, TILE, -1), zs.reshape(tiles, TILE, -1)], axis=1)  # [tiles, 2, c, blocks]
    return data, np.ascontiguousarray(floats.transpose(0, 3, 1, 2)).reshape(-1)


def byte_tiles(q: np.ndarray, pad: int = 0) -> np.ndarray:
    """Bytes q [N, K] (K a multiple of 4) in VNNI tiles of 16 columns, flat: [tiles, K / 4, 16, 4], byte (g, c, j)
    of tile t the value at row 4g + j of column 16t + c; columns past N hold `pad`. The 8-bit layout of
    pack_matrix and of nextn.Int8MatMul's weights (int8_matmul.pack_int8)."""
    n, k = q.shape
    tiles = -(-n // TILE)
    padded = np.pad(q, ((0, tiles * TILE - n), (0, 0)), constant_values=pad)
    return np.ascontiguousarray(padded.reshape(tiles, TILE, k // 4, 4).transpose(0, 2, 1, 3)).reshape(-1)
