"""GPTQ for blockwise 4-bit (or 8-bit) weights (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization").

Round-to-nearest minimizes each weight's own error. GPTQ minimizes the layer's output error on the
calibration inputs, ||X W - X Q(W)||^2, whose curvature is H = X^T X [K, K]: input channels are
quantized one at a time and each one's rounding error is pushed onto the not-yet-quantized channels
through the inverse Hessian, so correlated inputs absorb it. Block scales are fixed from the already
updated weights when the sweep enters a block (as in the paper's grouped variant), so the result packs
into MatMulNBits exactly like round-to-nearest.
"""

from __future__ import annotations

import numpy as np

from nextn.calib.rewrite import BlockWeight, block_params

DAMP = 0.01  # relative diagonal damping (the paper's default): keeps H invertible for rarely active inputs


def gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, bits: int = 4, lazy: int = 128) -> BlockWeight:
    """W [K, N], H [K, K] (sum of x x^T over calibration rows) -> BlockWeight."""
    k, n = w.shape
    h = hessian.astype(np.float64, copy=True)
    work = w.astype(np.float64, copy=True)  # [K, N], rows = input channels
    dead = np.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    work[dead] = 0.0
    h[np.diag_indices(k)] += DAMP * np.mean(np.diag(h))
    # Upper Cholesky factor of H^-1: row i holds how channel i's error spreads to channels > i.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # [K, K]

    nb = -(-k // block_size)
    scale = np.ones((nb, n), np.float32)
    zero = np.zeros((nb, n), np.float32)
    q = np.empty((k, n), np.uint8)
    lazy = max(block_size, lazy - lazy % block_size)
    for a in range(0, k, lazy):
        b = min(k, a + lazy)
        chunk = work[a:b].copy()  # [L, N]
        err = np.zeros_like(chunk)
        hc = hinv[a:b, a:b]
        for i in range(b - a):
            row = a + i
            g = row // block_size
            if row % block_size == 0:
                end = min(b - a, i + block_size)
                s, z = block_params(chunk[i:end][None].astype(np.float32), bits)
                scale[g], zero[g] = s[0], z[0]
            qi = np.clip(np.rint(chunk[i] / scale[g]) + zero[g], 0, 2**bits - 1)
            q[row] = qi
            e = (chunk[i] - (qi - zero[g]) * scale[g]) / hc[i, i]  # [N]
            chunk[i:] -= np.outer(hc[i, i:], e)
            err[i] = e
        work[b:] -= hinv[a:b, b:].T @ err  # lazy batch update of the remaining channels
    return BlockWeight(q, scale, zero, block_size, bits)
