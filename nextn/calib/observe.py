"""Collect activation statistics from the fp32 graphs on realistic decoding states.

Each graph is opened once more with the inputs of its linears added as outputs (a *probe*), sharing
the artifact's memory-mapped weights. Every calibration sequence then runs the way the runtime runs it,
with real, growing KV caches:

    tokens  0 ........ P-1 | P | P+1 .. P+4 | P+5 | ... | n-1
            prefill (n/2)    1    verify (4)    1     alternate decode and verify shapes

The trunk runs each chunk; MTP module k runs the same chunk one token further ahead (slot i holds
token i+k+1 and the hidden of depth k-1 at slot i, as runtime/decoder.py feeds it). Every probed
activation updates its statistics:
  pass 1   amax (all methods)
  pass 2   a 2048-bin histogram of |x| over [0, amax] (entropy and percentile methods only)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from nextn.export import io
from nextn.runtime.engines import SharedWeights

VERIFY = 4  # tokens per verify step: draft 3 + 1, the runtime's usual shape (nextn demo, bench)
BINS = 2048


def chunks(n: int) -> list[tuple[int, int]]:
    """[a, b) chunks of a sequence of n tokens: a prefill of half, then decode (1) and verify (VERIFY)."""
    p = max(1, n // 2)
    out, a, size = [(0, p)], p, 1
    while a < n:
        out.append((a, min(n, a + size)))
        a += size
        size = VERIFY if size == 1 else 1
    return out


@dataclass
class TensorStats:
    amax: float = 0.0
    rows: int = 0
    finite: bool = True
    hist: np.ndarray | None = None  # [BINS] counts of |x| over [0, amax]

    def update_range(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x2 = x.reshape(-1, x.shape[-1])
        if not np.isfinite(x2).all():
            self.finite = False
            return
        self.rows += x2.shape[0]
        self.amax = max(self.amax, float(np.abs(x2).max()))

    def update_hist(self, x: np.ndarray) -> None:
        if x.size == 0 or self.amax <= 0 or not self.finite:
            return
        # clipped to amax: a value a hair above pass 1's maximum (threaded reductions) still counts
        counts, _ = np.histogram(np.minimum(np.abs(x), self.amax), bins=BINS, range=(0.0, self.amax))
        self.hist = counts if self.hist is None else self.hist + counts


@dataclass
class Probe:
    """One graph's probe session and the activations it reports."""

    graph: str
    session: object
    outputs: list[str]  # the graph's own outputs
    probed: list[str]
    shared: SharedWeights  # the session borrows the mapping's memory: keep it alive as long


def open_probe(graph: str, path: Path, probed: list[str], shared: SharedWeights, scratch: Path,
               threads: int) -> Probe:  # fmt: skip
    """A session of the graph at `path` that also returns the `probed` activations.

    Every weight comes from the shared mapping (`SessionOptions.add_initializer`). ONNX Runtime still
    checks that external-data files exist inside the model's folder (symlinks resolved), so the probe
    graph is saved in `scratch` beside a sparse placeholder of the weights file's size: no bytes copied,
    none read. Graph optimizations are off in a probe: ONNX Runtime's constant folding reads the weights
    it folds (the absorbed-attention slices of kv_b_proj) from the file, not from the handed-over values,
    and would fold the placeholder's zeros (tests/calib checks probe outputs against the engine's)."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    own = [o.name for o in model.graph.output]
    inputs = {i.name for i in model.graph.input}
    for name in probed:
        if name not in own and name not in inputs:  # a graph input is read from the feed instead
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            model.graph.output[-1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    scratch.mkdir(parents=True, exist_ok=True)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if t.data_type not in SharedWeights._NP:
                raise ValueError(f"{path}: initializer {t.name} has data type {t.data_type}, not calibratable")
            name = ExternalDataInfo(t).location
            if not (scratch / name).exists():
                with open(scratch / name, "wb") as f:
                    f.truncate((path.parent / name).stat().st_size)
    onnx.save(model, str(scratch / f"probe_{path.name}"))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    shared.add_to(so, path)
    session = ort.InferenceSession(str(scratch / f"probe_{path.name}"), so, providers=["CPUExecutionProvider"])
    return Probe(graph, session, own, list(probed), shared)


Visit = Callable[[str, dict[str, np.ndarray]], None]  # (graph, probed arrays)


def drive(probes: dict[str, Probe], cfg: dict, sequences: list[list[int]], visit: Visit,
          tick: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Run every sequence through the probes chunk by chunk with real caches; `visit` sees each call's
    probed activations."""
    layers, n_mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    r, d = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    mtp = [k for k in range(n_mtp) if f"mtp_{k}" in probes]
    for ids in sequences:
        n = len(ids)
        kv = [[np.zeros((1, 0, r), np.float32), np.zeros((1, 0, d), np.float32)] for _ in range(layers)]
        mkv = {k: [np.zeros((1, 0, r), np.float32), np.zeros((1, 0, d), np.float32)] for k in mtp}
        for a, b in chunks(n):
            feed = io.trunk_feed(np.asarray([ids[a:b]], np.int64), np.arange(a, b)[None], np.ones((1, b), np.int64), kv)
            out = _call(probes["trunk"], feed, visit)
            hidden = out[io.HIDDEN][0]  # [S, H]
            for i in range(layers):
                c, k = io.new(i)
                kv[i] = [np.concatenate([kv[i][0], out[c]], 1), np.concatenate([kv[i][1], out[k]], 1)]
            for k in mtp:  # slots a.. of module k; the last k+1 positions have no token k+1 ahead
                bk = min(b, n - k - 1)
                if bk <= a:
                    break
                feed = io.mtp_feed(np.asarray([ids[a + k + 1 : bk + k + 1]], np.int64), hidden[None, : bk - a],
                                   np.arange(a + k + 1, bk + k + 1)[None], np.ones((1, bk), np.int64), *mkv[k])  # fmt: skip
                out = _call(probes[f"mtp_{k}"], feed, visit)
                c_new, k_new = io.new()
                mkv[k] = [np.concatenate([mkv[k][0], out[c_new]], 1), np.concatenate([mkv[k][1], out[k_new]], 1)]
                hidden = out[io.HIDDEN_OUT][0]  # chained to depth k+1
        if tick:
            tick()


def _call(probe: Probe, feed: dict, visit: Visit) -> dict[str, np.ndarray]:
    names = probe.outputs + [p for p in probe.probed if p not in probe.outputs and p not in feed]
    values = probe.session.run(names, feed)
    out = dict(zip(names, values))
    visit(probe.graph, {p: out[p] if p in out else feed[p] for p in probe.probed})
    return out


# -- activation ranges from the statistics -----------------------------------------------------------
def calibrated_amax(stats: TensorStats, method: str, percentile: float = 99.99, levels: int = 128) -> float:
    """The clipping range of one activation: minmax (the observed |x| max), percentile (of |x|), or
    entropy (TensorRT's: the threshold whose `levels`-level quantized histogram is closest in KL). Entropy
    assumes int8's evenly spaced levels; for fp8 it is the same search, not one fitted to e4m3's grid."""
    if method == "minmax" or stats.hist is None:
        return stats.amax
    width = stats.amax / BINS
    if method == "percentile":
        cdf = np.cumsum(stats.hist) / stats.hist.sum()
        return float((np.searchsorted(cdf, percentile / 100.0) + 1) * width)
    return (_entropy_bins(stats.hist.astype(np.float64), levels) + 0.5) * width


def _entropy_bins(hist: np.ndarray, levels: int) -> int:
    """Number of histogram bins to keep (clip above them) minimizing KL(P || Q)."""
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # clipped mass lands in the last kept bin
        nz = p > 0
        edges = np.linspace(0, i, levels + 1).astype(int)  # strictly increasing: i >= levels
        sums = np.add.reduceat(hist[:i], edges[:-1])
        used = np.add.reduceat(nz.astype(np.float64), edges[:-1])
        level = np.repeat(np.arange(levels), np.diff(edges))
        # each level's mass spread evenly over its non-empty bins
        q = np.where(nz, sums[level] / np.maximum(used[level], 1), 0.0)
        if p.sum() == 0:
            continue
        p /= p.sum()
        q /= max(q.sum(), 1e-30)
        m = p > 0
        if (q[m] == 0).any():
            continue
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best:
            best, best_i = kl, i
    return best_i
