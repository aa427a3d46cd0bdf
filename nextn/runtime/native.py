"""nextn's CPU kernels (`kernels/*.c`: routed experts, latent attention) as one ONNX Runtime custom-op library.

The kernels are C, compiled once per machine with its C compiler into the cache (`cache_root()/kernels`), with
`-march=native` so that their lane loops become the machine's widest FMAs. The cache key holds the sources, the
flags, the compiler's version and the CPU's flags, so a home folder shared by different machines builds one
library per kind. Without a compiler, or if the build fails, `kernel_library()` warns once and returns None: the
graphs then keep their standard form (ONNX Runtime's MoE, the attention's ONNX function) and are slower, not
different. No ONNX Runtime headers are needed (kernels/ort_api.h).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

DOMAIN = "nextn"  # the custom op domain the library registers (RegisterCustomOps in kernels/ort_api.c)
SOURCES = tuple(sorted(Path(__file__).with_name("kernels").glob("*.[ch]")))
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
FALLBACK = "nextn's kernels are not used (slower, not different)"


@functools.lru_cache(maxsize=1)
def kernel_library() -> Path | None:
    """The compiled kernel library (built into the cache on first use), or None where it cannot be built."""
    from nextn.embedded import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler (cc, gcc or $CC): %s", FALLBACK)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s --version failed (%s): %s", cc, e, FALLBACK)
        return None
    key = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in SOURCES))
    key.update(" ".join(CFLAGS).encode() + version.encode() + _cpu_flags())
    out = cache_root() / "kernels" / f"nextn-kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")
    sources = [str(p) for p in SOURCES if p.suffix == ".c"]
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", str(tmp), *sources, "-lm"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        why = None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    if why is not None:
        tmp.unlink(missing_ok=True)
        log.warning("building nextn's kernels failed (%s): %s", why, FALLBACK)
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


def retype(tensor, value) -> None:
    """Give an initializer's proto the shape and element type of `value`, the array a session gets in its place
    (a kernel's layout of the same weights)."""
    from onnx import helper

    del tensor.dims[:]
    tensor.dims.extend(value.shape)
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)


def use_kernel_nodes(model, nodes: list, dropped: set[str] | frozenset = frozenset()) -> None:
    """Install `nodes` (some of them on nextn's kernels) as `model`'s graph, in place: its stored value shapes
    forgotten (the rewrites change them; ONNX Runtime infers them again), the `dropped` initializers (those the
    kernels' copies replace) gone and nextn's domain imported."""
    from onnx import helper

    if dropped:
        kept = [t for t in model.graph.initializer if t.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
