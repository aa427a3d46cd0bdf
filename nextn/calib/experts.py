"""Fused MoE experts (`nextn export --moe fused`): their calibration statistics and QMoE weights.

A fused MoE node hides its experts' matrix products, so sequential GPTQ (sequential.py) sees what feeds
them instead: the MoE's input x [N, H] and the routing as router_probs [N, E] (finite exactly at the experts
a token picked). Expert e's fc1 (gate/up) input is then the rows of x that picked e, and its fc2 (down)
input is silu(gate) * up of those rows, recomputed here from the fp32 weights:

    x [N, H] ─ rows where router_probs[:, e] is finite ─ x_e [n_e, H] ─────────────── H1_e += x_e^T x_e
                                                           └ x_e @ w13[e]^T ─ silu(gate) * up ─ a_e [n_e, I] ─ H2_e += a_e^T a_e

Each expert's fc1 [2I, H] and fc2 [H, I] are then quantized like any linear (GPTQ with its own Hessian,
or round-to-nearest; an expert no calibration token picked falls back to round-to-nearest) and packed
into ONNX Runtime's QMoE: the same routing and SwiGLU, int4 or int8 blockwise weights, int8 activations
inside the kernel (accuracy_level 4, as MatMulNBits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from nextn.calib.gptq import gptq
from nextn.calib.rewrite import BlockWeight, Experts, quantize_rtn

log = logging.getLogger(__name__)


def expert_bits(scheme: str) -> int | None:
    """Bits of the fused experts' weights per scheme: int4 -> 4, int8 -> 8 (weight-only; QMoE quantizes
    activations itself), fp8 -> None (ONNX Runtime's CPU QMoE has no fp8 kernel: the experts stay float)."""
    return {"int4": 4, "int8": 8}.get(scheme)


def expert_block_size(ex: Experts, requested: int, sizes: tuple[int, ...]) -> int | None:
    """The largest block size <= `requested` (of `sizes`) dividing both the hidden size and the expert width:
    QMoE has no padded last block as MatMulNBits has, so the experts take a smaller block where the
    requested one does not divide them (e.g. --block-size 128 on experts 96 wide: 32). None if none fits."""
    fits = [b for b in sizes if b <= requested and ex.hidden % b == 0 and ex.inter % b == 0]
    return max(fits) if fits else None


def unsupported(ex: Experts, block_size: int, sizes: tuple[int, ...]) -> str | None:
    """Why QMoE cannot take these experts at `block_size` or any smaller one, or None."""
    if expert_block_size(ex, block_size, sizes) is None:
        return (f"QMoE needs hidden {ex.hidden} and expert width {ex.inter} divisible by a block size <= "
                f"--block-size {block_size}")  # fmt: skip
    return None


@dataclass
class ExpertStats:
    """Per expert: calibration rows seen and the Hessians of its fc1 and fc2 inputs (float64)."""

    ex: Experts
    w13: np.ndarray  # [E, 2I, H]
    experts: range | None = None  # the experts to collect (sequential GPTQ's chunks); None: all
    rows: np.ndarray = field(init=False)  # [E]
    h1: list = field(init=False)  # E x [H, H] or None
    h2: list = field(init=False)  # E x [I, I] or None

    def __post_init__(self):
        self.rows = np.zeros(self.ex.n_experts, np.int64)
        self.h1 = [None] * self.ex.n_experts
        self.h2 = [None] * self.ex.n_experts

    def update(self, x: np.ndarray, probs: np.ndarray) -> None:
        x2 = x.reshape(-1, self.ex.hidden)  # [N, H]
        picked = np.isfinite(probs.reshape(-1, self.ex.n_experts))  # [N, E]
        if not np.isfinite(x2).all():
            return
        for e in self.experts or range(self.ex.n_experts):
            xe = x2[picked[:, e]]  # [n_e, H]
            if not len(xe):
                continue
            g = xe @ self.w13[e].T  # [n_e, 2I]
            a = (g[:, 0::2] / (1 + np.exp(-g[:, 0::2])) * g[:, 1::2]).astype(np.float64)  # [n_e, I]
            xd = xe.astype(np.float64)
            self.rows[e] += len(xe)
            self.h1[e] = xd.T @ xd if self.h1[e] is None else self.h1[e] + xd.T @ xd
            self.h2[e] = a.T @ a if self.h2[e] is None else self.h2[e] + a.T @ a

    @staticmethod
    def nbytes(ex: Experts, n_experts: int | None = None) -> int:
        """Memory held while observing `n_experts` (None: all): the float64 Hessians and the fp32 w13 the fc2
        inputs are computed from."""
        n = ex.n_experts if n_experts is None else n_experts
        return n * (8 * (ex.hidden**2 + ex.inter**2) + 4 * 2 * ex.inter * ex.hidden)


def quantize_experts(w13: np.ndarray, w2: np.ndarray, stats: ExpertStats | None, block_size: int, bits: int,
                     methods: dict[str, int], experts: range | None = None) -> tuple[list[BlockWeight], list[BlockWeight]]:  # fmt: skip
    """Each expert's (of `experts`; None: all) fc1 (W [H, 2I]) and fc2 (W [I, H]) as BlockWeights: GPTQ where
    `stats` saw the expert, else round-to-nearest; `methods` counts which (per matrix)."""
    fc1, fc2 = [], []
    for e in experts or range(w13.shape[0]):
        h1, h2 = (stats.h1[e], stats.h2[e]) if stats is not None else (None, None)
        for w, h, out in ((w13[e].T, h1, fc1), (w2[e].T, h2, fc2)):
            q = None
            if h is not None:
                try:
                    q = gptq(np.ascontiguousarray(w), h, block_size, bits)
                    methods["gptq"] += 1
                except np.linalg.LinAlgError:  # a Hessian damping could not make positive definite
                    log.warning("expert %d: GPTQ's Hessian is singular; round-to-nearest instead", e)
                    q = None
            if q is None:
                q = quantize_rtn(np.ascontiguousarray(w), block_size, bits)
                methods["rtn"] += 1
            out.append(q)
    return fc1, fc2
