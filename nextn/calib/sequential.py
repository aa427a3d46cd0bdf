"""The layer-at-a-time calibration pass: sequential GPTQ for int4 graphs, activation ranges for int8 /
fp8 graphs, with one layer of the model in memory at a time.

GPTQ fits a layer's quantized weights to its calibration inputs (gptq.py). Measured on the fp32 model,
every layer's inputs would be those of an unquantized model; run sequentially, as the GPTQ paper and
its successors do, layer i sees what the quantized layers 0..i-1 really hand it, so each layer also
absorbs part of the error of those before it. The artifact's source checkpoint runs a layer at a time
(model/streamed.py's TopLoaded), inside the export forms the artifact was written in (fused MoE, fused rope:
the same weights, laid out as the graphs hold them):

    calibration ids ─ embed ─ x_0 [1, n, H] per sequence (all kept: the calibration activations)
    layer i: load ─ run every x_i with hooks: H += x^T x per linear input, ExpertStats per fused MoE
               ─ GPTQ each linear (experts per expert) ─ write the dequantized weights into the layer
               ─ run again: x_{i+1} from the quantized layer ─ drop the layer
    trunk head: GPTQ on norm(x_L); MTP module k: the same on (ids shifted k + 1, depth k-1's hidden)

Memory: one layer, its Hessians (float64, at most HESSIAN_RAM_FRACTION of RAM: a fused MoE's experts in
chunks that fit, the layer run once per chunk) and the calibration activations. Each quantized weight is spilled to `folder` under the fingerprint of its fp32 values [K, N]
(experts: of the stacked w13), which is how the ONNX rewrite finds it: a graph's initializers carry no
layer names, but their bytes are the checkpoint's under the same export forms.

int8 / fp8 graphs (Q/DQ) need the range of every linear's input instead: the same pass runs their
layers unchanged with hooks that collect observe.TensorStats (amax; a second run of the layer for the
histogram when the method needs one), keyed the same way by the linear's weight fingerprint. The
activations are a causal model's, so a full-sequence prefill sees the values the decode and verify
chunks of observe.drive see (up to float rounding), without the fp32 graphs open.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nextn.calib import experts as fused
from nextn.calib.gptq import gptq
from nextn.calib.observe import TensorStats
from nextn.calib.rewrite import BlockWeight, Experts, quantize_rtn
from nextn.errors import NextnError
from nextn.model.streamed import TopLoaded
from nextn.model.weights import trim_heap

log = logging.getLogger(__name__)

HESSIAN_RAM_FRACTION = 1 / 4  # one layer's Hessians may take at most this share of physical memory


def fingerprint(w: np.ndarray) -> str:
    """Identity of a weight by its fp32 bytes and shape (a linear's [K, N], a fused MoE's w13 [E, 2I, H])."""
    w = np.ascontiguousarray(w, np.float32)
    return f"{'x'.join(map(str, w.shape))}-{hashlib.blake2b(w.data, digest_size=16).hexdigest()}"


@dataclass
class Quantized:
    """The pass's quantized weights, spilled to `folder`: graph -> fingerprint -> file; and the activation
    statistics of the Q/DQ graphs' linears: graph -> fingerprint -> TensorStats."""

    folder: Path
    files: dict[str, dict[str, Path]] = field(default_factory=dict)
    used: set[Path] = field(default_factory=set)
    ranges: dict[str, dict[str, TensorStats]] = field(default_factory=dict)

    def input_stats(self, graph: str, w_kn: np.ndarray) -> TensorStats | None:
        """The statistics of the input of `graph`'s linear whose fp32 weight is `w_kn` (None: no such linear)."""
        return self.ranges.get(graph, {}).get(fingerprint(w_kn))

    def _save(self, graph: str, key: str, **arrays) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{graph}-{len(self.files.get(graph, {}))}.npz"
        np.savez(path, **arrays)
        self.files.setdefault(graph, {})[key] = path

    def _load(self, graph: str, w: np.ndarray):
        path = self.files.get(graph, {}).get(fingerprint(w))
        if path is None:
            return None
        self.used.add(path)
        return np.load(path)

    def save_linear(self, graph: str, w_kn: np.ndarray, q: BlockWeight, method: str) -> None:
        self._save(graph, fingerprint(w_kn), q=q.q, scale=q.scale, zero=q.zero, block=q.block_size, bits=q.bits,
                   method=method)  # fmt: skip

    def linear(self, graph: str, w_kn: np.ndarray) -> tuple[BlockWeight, str] | None:
        """The BlockWeight GPTQ chose for the linear of `graph` whose fp32 weight is `w_kn`, and how."""
        z = self._load(graph, w_kn)
        if z is None:
            return None
        return BlockWeight(z["q"], z["scale"], z["zero"], int(z["block"]), int(z["bits"])), str(z["method"])

    def save_experts(self, graph: str, w13: np.ndarray, fc1: list[BlockWeight], fc2: list[BlockWeight],
                     methods: dict[str, int]) -> None:  # fmt: skip
        arrays = {f"{name}_{part}": np.stack([getattr(b, part) for b in bws])
                  for name, bws in (("fc1", fc1), ("fc2", fc2)) for part in ("q", "scale", "zero")}  # fmt: skip
        self._save(graph, fingerprint(w13), **arrays, block=fc1[0].block_size, bits=fc1[0].bits,
                   gptq=methods["gptq"], rtn=methods["rtn"])  # fmt: skip

    def experts(self, graph: str, w13: np.ndarray):
        """(fc1, fc2, methods) of the fused MoE of `graph` whose stacked fp32 w13 is `w13`, or None."""
        z = self._load(graph, w13)
        if z is None:
            return None
        block, bits = int(z["block"]), int(z["bits"])
        fc1, fc2 = ([BlockWeight(q, s, zr, block, bits) for q, s, zr in zip(z[f"{n}_q"], z[f"{n}_scale"], z[f"{n}_zero"])]
                    for n in ("fc1", "fc2"))  # fmt: skip
        return fc1, fc2, {"gptq": int(z["gptq"]), "rtn": int(z["rtn"])}

    def unused(self) -> int:
        """Weights the pass quantized that no graph asked for (tests: the pass and the graphs agree)."""
        return sum(len(f) for f in self.files.values()) - len(self.used)


def _fused_moes(part: nn.Module) -> list[nn.Module]:
    """The part's MoEs in the fused export form (their experts run as one op, not as graph linears)."""
    from nextn.model.reference import MoE

    return [m for m in part.modules() if isinstance(m, MoE) and "fused_w13" in m._buffers]


def _graph_linears(part: nn.Module) -> list[nn.Linear]:
    """The part's linears the graph holds as MatMuls: all but a fused MoE's experts."""
    inside = {id(lin) for moe in _fused_moes(part) for lin in moe.experts.modules()}
    return [m for m in part.modules() if isinstance(m, nn.Linear) and id(m) not in inside]


def _experts(moe: nn.Module) -> Experts:
    """A fused MoE's shape, as calib/experts.py takes it."""
    e, i2, h = moe.fused_w13.shape  # [E, 2I, H]
    return Experts("", "", "", "", "", e, h, i2 // 2)


def _weight_kn(linear: nn.Linear) -> np.ndarray:
    """[K, N] fp32, as the graph's MatMul holds the weight (what fingerprints are taken of)."""
    return linear.weight.detach().float().t().contiguous().numpy()


@dataclass
class _Hessian:
    h: torch.Tensor | None = None  # [K, K] float64

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()  # [N, K]
        self.h = x2.T @ x2 if self.h is None else self.h.addmm_(x2.T, x2)


class _Observer:
    """Hooks on a part's linears and fused MoEs: the Hessians of their inputs over every call.

    Linears fed the same tensor (q_a and kv_a, gate and up) share one Hessian: within one call of the
    part, the tensors seen are held, so an input is recognised by identity, never by a reused address."""

    def __init__(self, part: nn.Module, moe_block: Callable[[Experts], int | None], budget: int, where: str,
                 experts: range | None = None, linears: bool = True):  # fmt: skip
        """`experts`: the fused MoE's experts to collect (None: all); `linears`: whether to collect the
        linears' (a later chunk of experts does not)."""
        self.linears: dict[nn.Linear, _Hessian] = {}
        self.moes: dict[nn.Module, fused.ExpertStats] = {}
        self.moe_block, self.experts = moe_block, experts
        self.seen: list[tuple[torch.Tensor, _Hessian]] = []
        self.followers: set[nn.Linear] = set()
        self.bytes, self.budget, self.where = 0, budget, where
        self.hooks = [m.register_forward_pre_hook(self._linear) for m in (_graph_linears(part) if linears else [])]
        self.hooks += [m.register_forward_pre_hook(self._moe) for m in _fused_moes(part)]

    def new_call(self) -> None:
        self.seen.clear()

    def linear_bytes(self) -> int:
        return sum(8 * h.h.shape[0] ** 2 for h in {id(h): h for h in self.linears.values()}.values() if h.h is not None)

    def _charge(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bytes > self.budget:
            raise NextnError(f"--weight-method gptq: the Hessians of {self.where} need over "
                             f"{self.bytes / 2**30:.1f} GiB (more than {HESSIAN_RAM_FRACTION:.0%} of RAM); "
                             "use --weight-method rtn")  # fmt: skip

    def _linear(self, module: nn.Linear, args) -> None:
        x = args[0]
        shared = next((h for t, h in self.seen if t is x), None)
        if module not in self.linears:
            if shared is not None:
                self.linears[module] = shared
                self.followers.add(module)
                return
            self._charge(8 * module.in_features**2)
            self.linears[module] = _Hessian()
        if module in self.followers:
            if shared is not self.linears[module]:
                raise RuntimeError(f"{self.where}: a linear sharing its input's Hessian was fed another tensor")
            return
        self.linears[module].add(x.detach())
        self.seen.append((x, self.linears[module]))

    def _moe(self, module, args) -> None:
        from nextn.model.reference import route

        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1]).float()  # [N, H]
        if module not in self.moes:
            ex = _experts(module)
            if self.moe_block(ex) is None:  # QMoE cannot take these experts: the rewrite keeps them float
                return
            self._charge(fused.ExpertStats.nbytes(ex, None if self.experts is None else len(self.experts)))
            self.moes[module] = fused.ExpertStats(ex, module.fused_w13.numpy(), self.experts)
        c = module.gate.cfg
        ids, _ = route(flat, module.gate.weight, module.gate.e_score_correction_bias, c.num_experts_per_tok,
                       c.n_group, c.topk_group, True, 1.0)  # [N, top_k]  # fmt: skip
        probs = np.full((flat.shape[0], module.fused_w13.shape[0]), -np.inf, np.float32)  # [N, E]
        np.put_along_axis(probs, ids.numpy(), 0.0, axis=1)
        self.moes[module].update(flat.numpy(), probs)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


@dataclass(frozen=True)
class PassSettings:
    block_size: int
    head_bits: int
    block_sizes: tuple[int, ...]  # what the experts may fall back to (experts.expert_block_size)
    histograms: bool = False  # int8 / fp8: also |x| histograms (entropy and percentile ranges)


class _RangeObserver:
    """Hooks on a part's linears: their inputs' statistics, into `stats` under each weight's fingerprint.
    Every linear of the part gets an entry, reached or not (an expert no token was routed to keeps
    rows = 0, as a probe reports it)."""

    def __init__(self, part: nn.Module, stats: dict[str, TensorStats]):
        self.stats, self.hist, self.hooks = {}, False, []
        for m in _graph_linears(part):
            self.stats[m] = stats.setdefault(fingerprint(_weight_kn(m)), TensorStats())
            self.hooks.append(m.register_forward_pre_hook(self._linear))

    def new_call(self) -> None:
        pass

    def _linear(self, module: nn.Linear, args) -> None:
        x = args[0].detach().float().numpy()  # [1, n, K] or [rows, K] (a sparse MoE's routed rows)
        s = self.stats[module]
        s.update_hist(x) if self.hist else s.update_range(x)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def expert_chunks(n_experts: int, per_expert: int, room: int) -> list[range | None]:
    """The experts of a fused MoE in chunks whose Hessians (`per_expert` bytes each) fit in `room` bytes:
    [None] (all at once) when they all fit, or when not even one does (the observer then refuses)."""
    per = room // per_expert if per_expert else n_experts
    if per >= n_experts or per < 1:
        return [None]
    return [range(a, min(n_experts, a + per)) for a in range(0, n_experts, per)]


def _chunks_for(part: nn.Module, moe_block: Callable[[Experts], int | None], budget: int) -> list[range | None]:
    """A part's expert chunks: what of the Hessian budget its linears leave (counted as if none shared one)."""
    moes = _fused_moes(part)
    if not moes:
        return [None]
    (moe,) = moes  # a decoder layer or MTP block holds one MoE
    linear_bytes = sum(8 * m.in_features**2 for m in _graph_linears(part))
    ex = _experts(moe)
    if moe_block(ex) is None:
        return [None]
    return expert_chunks(ex.n_experts, fused.ExpertStats.nbytes(ex, 1), budget - linear_bytes)


def _quantize_experts(obs: _Observer, results: dict) -> None:
    """GPTQ the experts `obs` collected (a chunk, or all), into `results`: module -> (fc1, fc2, methods) by
    expert. The weights stay fp32 until every chunk is done (write_experts): a later chunk's run must see
    the same layer."""
    for module in list(obs.moes):
        stats = obs.moes.pop(module)
        w13, w2 = module.fused_w13.numpy(), module.fused_w2.numpy()  # [E, 2I, H], [E, H, I]
        fc1, fc2, methods = results.setdefault(module, ({}, {}, {"gptq": 0, "rtn": 0}))
        experts = stats.experts or range(w13.shape[0])
        q1, q2 = fused.quantize_experts(w13, w2, stats, obs.moe_block(stats.ex), 4, methods, experts)
        fc1.update(zip(experts, q1))
        fc2.update(zip(experts, q2))
        del stats
    trim_heap()  # the experts' Hessians (13 MB each on the 2b preset) were heap blocks glibc would keep


def _write_experts(results: dict, graph: str, out: Quantized) -> None:
    """Spill each MoE's experts under the fingerprint of its fp32 w13, then write their dequantized weights."""
    for module, (fc1, fc2, methods) in results.items():
        w13, w2 = module.fused_w13.numpy(), module.fused_w2.numpy()
        n = w13.shape[0]
        fc1, fc2 = [fc1[e] for e in range(n)], [fc2[e] for e in range(n)]
        out.save_experts(graph, w13, fc1, fc2, methods)
        for e in range(n):  # in place: the experts' parameters are views of the stacks
            w13[e] = fc1[e].dequantize().T
            w2[e] = fc2[e].dequantize().T


def _quantize_linears(obs: _Observer, graph: str, out: Quantized, s: PassSettings, heads: tuple[nn.Module, ...]) -> None:
    """GPTQ every linear `obs` saw; their dequantized weights replace the fp32 ones in the part (the heads'
    are only spilled: nothing downstream reads their logits, and their weight is shared). Each Hessian is
    let go once used: an MTP module's expert Hessians would otherwise still be held while its head (the
    vocabulary-wide GPTQ) is quantized."""
    obs.new_call()  # the last call's inputs
    for module in list(obs.linears):
        hess = obs.linears.pop(module)  # a Hessian two linears share goes with the second
        w_kn = _weight_kn(module)
        is_head = any(module is h for h in heads)
        bits = s.head_bits if is_head else 4
        try:
            q, method = gptq(w_kn, hess.h.numpy(), s.block_size, bits), "gptq"
        except np.linalg.LinAlgError:  # a Hessian damping could not make positive definite
            log.warning("%s: GPTQ's Hessian is singular; round-to-nearest instead", graph)
            q, method = quantize_rtn(w_kn, s.block_size, bits), "rtn"
        del hess
        out.save_linear(graph, w_kn, q, method)
        if not is_head:  # (sequential_pass runs under torch.no_grad)
            module.weight.copy_(torch.from_numpy(q.dequantize().T))
    trim_heap()  # GPTQ's float64 work arrays of up to 32 MB come from the heap, which glibc would keep


def _observe_and_quantize(part: nn.Module, run: Callable[[_Observer | None], object], graph: str, out: Quantized,
                          s: PassSettings, heads: tuple[nn.Module, ...], where: str) -> None:  # fmt: skip
    """Collect the part's Hessians over a run of every sequence, then quantize it in place. When its
    experts' Hessians do not fit beside its linears' in the budget, the part runs once per chunk of
    experts (the linears' are collected in the first), all from the same fp32 part."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = int(ram * HESSIAN_RAM_FRACTION)

    def moe_block(ex: Experts) -> int | None:
        return fused.expert_block_size(ex, s.block_size, s.block_sizes)

    chunks = _chunks_for(part, moe_block, budget)
    if len(chunks) > 1:
        log.info("%s: the experts' Hessians in %d chunks of %d: the part runs %d times", where, len(chunks),
                 len(chunks[0]), len(chunks))  # fmt: skip
    results: dict = {}
    first = None
    for c, experts in enumerate(chunks):
        held = first.linear_bytes() if first else 0  # the linears' Hessians, kept until the last chunk
        obs = _Observer(part, moe_block, budget - held, where, experts, linears=c == 0)
        try:
            run(obs)
        finally:
            obs.close()
        _quantize_experts(obs, results)
        first = first or obs
    _write_experts(results, graph, out)
    _quantize_linears(first, graph, out, s, heads)


@dataclass
class _Pass:
    """One pass: the model with its top group loaded, the export forms, what to quantize and where to."""

    top: TopLoaded
    forms: object  # exporter.ExportForms
    schemes: dict[str, str]
    settings: PassSettings
    out: Quantized
    tick: Callable[[], None]

    def _calibrate(self, part, run, graph: str, where: str):
        """Calibrate `part` as its graph's scheme asks. Returns its outputs when the observed run gave them
        (weights unchanged), else None: the caller runs the quantized part again."""
        scheme = self.schemes[graph]
        if scheme == "int4":
            model = self.top.model
            heads = (model.lm_head, *(m.shared_head.head for m in model.mtp))
            _observe_and_quantize(part, run, graph, self.out, self.settings, heads, where)
            return None
        if scheme not in ("int8", "fp8"):
            return None
        obs = _RangeObserver(part, self.out.ranges.setdefault(graph, {}))
        try:
            ys = run(obs)
            if self.settings.histograms:  # over [0, amax]: a second run once amax is known
                obs.hist = True
                run(obs)
        finally:
            obs.close()
        return ys

    def _layer(self, index: int, part: nn.Module):
        return self.top.layer(index, part, self.forms, self.forms.stack_experts)

    def trunk(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Every layer in turn over x [1, n, H] per sequence, then the head; the trunk's hidden outputs."""
        model = self.top.model
        inputs = self.top.prefill_inputs(sequences)  # [x, cos, sin, mask] per sequence
        xs = [state.pop(0) for state in inputs]  # the hidden states, replaced layer by layer; [cos, sin, mask] stay
        empty = model.empty_kv(1, torch.float32, "cpu")
        for i, block in enumerate(model.model.layers):
            with self._layer(i, block):

                def run(obs, block=block):
                    ys = []
                    for x, (cos, sin, mask) in zip(xs, inputs):
                        if obs:
                            obs.new_call()
                        ys.append(block(x, model.rotary, cos, sin, mask, empty, model.absorbed)[0])
                    return ys

                ys = self._calibrate(block, run, "trunk", f"layer {i}")
                xs = ys if ys is not None else run(None)
            self.tick()
        hidden = [model.model.norm(x) for x in xs]  # [1, n, H]: the trunk's hidden output, MTP 0's input

        def run_head(obs):
            for h in hidden:  # each sequence's logits dropped at once: all of them would be n x V x 4 bytes
                if obs:
                    obs.new_call()
                model.lm_head(h)

        self._calibrate(model.lm_head, run_head, "trunk", "the head")
        return hidden

    def mtp(self, k: int, sequences: list[list[int]], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """MTP module k (slot j: token j + k + 1 and depth k-1's hidden at slot j); its hidden outputs."""
        model, module = self.top.model, self.top.model.mtp[k]
        feeds = [(torch.tensor([ids[k + 1 :]]), h[:, : len(ids) - k - 1], torch.arange(k + 1, len(ids))[None])
                 for ids, h in zip(sequences, hidden) if len(ids) > k + 1]  # fmt: skip
        with self._layer(model.cfg.num_hidden_layers + k, module):

            def run(obs):
                outs = []
                for ids, h, pos in feeds:
                    if obs:
                        obs.new_call()
                    outs.append(model.mtp_forward(k, ids, h, pos).hidden)
                return outs

            outs = self._calibrate(module, run, f"mtp_{k}", f"MTP module {k}")
            hidden = outs if outs is not None else run(None)
        self.tick()
        return hidden


def has_source(source: Path) -> bool:
    return (source / "config.json").is_file()


def check_source(source: Path) -> None:
    if not has_source(source):
        raise NextnError(f"--weight-method gptq: runs the artifact's source checkpoint a layer at a time, and "
                         f"{source} is not there; use --weight-method rtn")  # fmt: skip


@torch.no_grad()
def sequential_pass(source: Path, manifest: dict, schemes: dict[str, str], sequences: list[list[int]],
                    settings: PassSettings, folder: Path, tick: Callable[[], None] = lambda: None) -> Quantized:  # fmt: skip
    """Calibrate the graphs of the artifact `manifest` describes, layer by layer from its source checkpoint:
    GPTQ for the int4 graphs' linears and experts, input statistics for the int8 / fp8 graphs' linears
    (a graph of another scheme, or none, only runs); one tick per layer and MTP module."""
    from nextn.export.exporter import ExportForms
    from nextn.model.checkpoint import Checkpoint

    check_source(source)
    n_mtp = sum(1 for g in manifest["graphs"] if g != "trunk")
    top = TopLoaded.open(Checkpoint(source), n_mtp, manifest["attention"] == "absorbed")
    run = _Pass(top, ExportForms(manifest["moe"], manifest["opset"]), schemes, settings, Quantized(folder), tick)
    hidden = run.trunk(sequences)
    for k in range(n_mtp):
        hidden = run.mtp(k, sequences, hidden)
    return run.out
