"""Routed experts through nextn's own CPU kernel (`routed_experts.c`), in place of ONNX Runtime's fp32 `MoE`.

ONNX Runtime's CPU `MoE` multiplies each picked expert by a general GEMM on its transposed weights, which
repacks them at every call: at decode widths (1-8 tokens) that costs more than reading them. Measured on the
embedded model's sizes (8 layers, E 8, H 256, I 96, top 2; `benchmarks/routed_experts.py`), the kernel
takes 0.6-0.7x the op's time at 1 to 4 tokens. It reads each picked expert's weights once for all the tokens
that picked it, and a token's output does not depend on the other tokens in the call.

A session that pre-packs (engines._load_forms) rewrites each fp32 MoE node of the form nextn exports

    com.microsoft.MoE(x, router_probs, fc1 [E, 2I, H] gate/up rows interleaved, "", fc2 [E, H, I])
 -> nextn.RoutedExperts(x, router_probs, fc1 [E, H, 2I] gate columns then up columns, fc2 [E, I, H])

with the same k and normalize_routing_weights: the same function, the stacks transposed (private copies made
when the session opens, like the expert halves'). Where every weight of a node is a bfloat16 value (a bf16
checkpoint, as DeepSeek-V3's and the embedded model's are, exported in fp32), the node is RoutedExpertsBf16
and its stacks hold the bf16 bit patterns: half the bytes to read, the same fp32 values once widened, the same
fp32 arithmetic. The kernel is C, compiled once per machine with its C
compiler into the cache (`cache_root()/kernels`); without a compiler, or if the build fails, the graph keeps
ONNX Runtime's MoE (logged once) and is slower, not different.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import MS_DOMAIN

log = logging.getLogger(__name__)

DOMAIN = "nextn"  # the custom op domain the library registers (RegisterCustomOps in routed_experts.c)
OP_TYPE = "RoutedExperts"  # fp32 stacks
OP_TYPE_BF16 = "RoutedExpertsBf16"  # stacks of bf16 values, stored as their uint16 bit patterns
SOURCE = Path(__file__).with_name("routed_experts.c")
# -march=native: the kernel's lane loops become the machine's widest FMAs. The cache key holds the CPU's flags,
# so a home folder shared by different machines builds one library per kind.
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared")


@functools.lru_cache(maxsize=1)
def kernel_library() -> Path | None:
    """The compiled kernel library (built into the cache on first use), or None where it cannot be built."""
    from nextn.embedded import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler (cc, gcc or $CC): routed experts run on ONNX Runtime's MoE (slower)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s --version failed (%s): routed experts run on ONNX Runtime's MoE (slower)", cc, e)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + version.encode() + _cpu_flags())
    out = cache_root() / "kernels" / f"routed_experts-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        done = None
        why = str(e)
    if done is None or done.returncode != 0:
        why = why if done is None else (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
        tmp.unlink(missing_ok=True)
        log.warning("building %s failed (%s): routed experts run on ONNX Runtime's MoE (slower)", SOURCE.name, why)
        return None
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    return out


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    import platform

    return platform.processor().encode()


def use_routed_experts(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every fp32 MoE node of nextn's exported form whose stacks no other node reads and
    that the kernel runs faster than ONNX Runtime (takes_kernel).
    `array(name)` reads an initializer. -> the kernel's stacks by initializer name, to hand to the session in
    place of the file's (same names, new dims; bf16 ones in half the bytes)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    stacks: dict[str, np.ndarray] = {}
    nodes = []
    for node in model.graph.node:
        attrs = _plain_moe_attributes(node)
        weights = (node.input[2], node.input[4]) if attrs is not None else ()
        own = all(w in inits and readers[w] == 1 and inits[w].data_type == onnx.TensorProto.FLOAT for w in weights)
        if attrs is None or not own:
            nodes.append(node)
            continue
        fc1, fc2 = array(weights[0]), array(weights[1])  # [E, 2I, H] interleaved, [E, H, I]
        bf16 = is_bf16(fc1) and is_bf16(fc2)  # a bf16 checkpoint's weights: read in half the bytes, same values
        if not takes_kernel(fc1[0].nbytes + fc2[0].nbytes, bf16):
            nodes.append(node)
            continue
        pair = transposed_stacks(fc1, fc2)
        for name, w in zip(weights, pair):
            stacks[name] = bf16_bits(w) if bf16 else w
            del inits[name].dims[:]
            inits[name].dims.extend(w.shape)
            inits[name].data_type = onnx.TensorProto.UINT16 if bf16 else onnx.TensorProto.FLOAT
        nodes.append(helper.make_node(OP_TYPE_BF16 if bf16 else OP_TYPE, [node.input[0], node.input[1], *weights],
                                      list(node.output), name=node.name, domain=DOMAIN, **attrs))  # fmt: skip
    if stacks:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.value_info[:]
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return stacks


# The kernel runs on the calling thread. ONNX Runtime's MoE spreads the experts over the session's threads
# (in halves: expert_halves.py) but repacks each picked expert at every call, a fixed cost that weighs most on
# small experts. Measured (benchmarks/routed_experts.py, trunk passes, kernel / MoE at 1, 2 and 4 new tokens):
# the embedded model (0.3 MB experts, bf16 values) 0.61-0.79 at one thread, 0.77-0.92 at two; issue 14's 1 GB
# checkpoint (3 MB experts) in fp32 1.02-1.07 at one thread and 1.17-1.30 at two, in bf16 0.79-0.91 at one
# thread and 0.94-1.09 at two. So fp32 experts above this size keep ONNX Runtime's MoE; bf16 ones, read in
# half the bytes, take the kernel at any size (and their stacks take half the memory).
KERNEL_MAX_FP32_EXPERT_BYTES = 1 << 20


def takes_kernel(expert_bytes: int, bf16: bool) -> bool:
    """Whether a MoE node whose experts hold `expert_bytes` of fp32 weights each runs on the kernel."""
    return bf16 or expert_bytes <= KERNEL_MAX_FP32_EXPERT_BYTES


def is_bf16(w: np.ndarray) -> bool:
    """Every fp32 value is a bfloat16 one (its low 16 bits zero): a bf16 checkpoint's weights, as exported."""
    return bool(not (np.ascontiguousarray(w).view(np.uint32) & 0xFFFF).any())


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """The bf16 bit patterns of fp32 values that are bf16 ones (exact): fp32's upper 16 bits, as uint16."""
    return (np.ascontiguousarray(w).view(np.uint32) >> 16).astype(np.uint16)


def transposed_stacks(fc1: np.ndarray, fc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MoE's stacks -> the kernel's: fc1 [E, 2I, H] (gate_0, up_0, gate_1, ... rows) -> [E, H, 2I] (the gate's
    I columns, then the up's); fc2 [E, H, I] -> [E, I, H]. Copies; the values are unchanged."""
    e, i2, h = fc1.shape
    kernel_fc1 = np.empty((e, h, i2), np.float32)
    kernel_fc1[:, :, : i2 // 2] = fc1[:, 0::2, :].transpose(0, 2, 1)
    kernel_fc1[:, :, i2 // 2 :] = fc1[:, 1::2, :].transpose(0, 2, 1)
    return kernel_fc1, np.ascontiguousarray(fc2.transpose(0, 2, 1))


def _plain_moe_attributes(node: onnx.NodeProto) -> dict | None:
    """k and normalize_routing_weights of a MoE node the kernel computes exactly (SwiGLU interleaved, alpha 1,
    beta 0, no clamp, no biases, no fc3), else None."""
    if node.domain != MS_DOMAIN or node.op_type != "MoE" or len(node.input) < 5:
        return None
    ins = list(node.input)
    if ins[3] or any(ins[5:]):  # fc1 bias, fc2 bias, fc3 and its bias
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    act = a.get("activation_type", b"")
    act = act.decode() if isinstance(act, bytes) else act
    if (act != "swiglu" or a.get("swiglu_fusion") != 1 or a.get("activation_alpha") != 1.0
            or a.get("activation_beta") != 0.0 or "swiglu_limit" in a or "k" not in a):  # fmt: skip
        return None
    return {"k": int(a["k"]), "normalize_routing_weights": int(a.get("normalize_routing_weights", 0))}
