"""A quantized trunk's linears on nextn's kernels (nextn.Int8MatMul, nextn.NBitsMatMul) against ONNX Runtime's
fused Q/DQ (MatMulIntegerToFloat) and MatMulNBits.

    python benchmarks/quantized_linears.py ARTIFACT [ARTIFACT ...] [--threads 1,2] [--rounds 9]

Each artifact (an int8 or int4 one, e.g. issue 14's: `python benchmarks/llama_parity.py` writes them) has its trunk
opened twice, with and without the two rewrites (every other kernel on in both), and runs 1, 2, 4 and 64 new tokens
after 64 random cache entries, the two alternating within each round. Prints medians, kernel / ONNX Runtime, and
the largest logit difference relative to the largest logit (int8: 0, bit for bit; int4: the rounding of the
activations to int8 can move by one step where a sum's last bit differs, and that compounds through the layers),
beside what ONNX Runtime's own ops make of the same input with every cached latent one ulp away (how far a last-bit
difference carries through that trunk at all).
"""

import argparse
from unittest import mock

import numpy as np
from quantized_experts import alternate  # benchmarks/: run as a script, its folder is on the path

from nextn.export import io
from nextn.runtime import int8_matmul, native, nbits_matmul
from nextn.runtime.engines import open_engines


def trunk(artifact: str, threads: int, rounds: int) -> None:
    kernel = open_engines(artifact, threads=threads, prepack=True)
    with (mock.patch.object(int8_matmul, "use_int8_matmul", lambda model, array: {}),
          mock.patch.object(nbits_matmul, "use_nbits_matmul", lambda model, array: {})):  # fmt: skip
        ort_ops = open_engines(artifact, threads=threads, prepack=True)
    cfg, rng, past_len = kernel.manifest["config"], np.random.default_rng(1), 64
    past = [(rng.standard_normal((1, past_len, cfg["kv_lora_rank"]), dtype=np.float32),
             rng.standard_normal((1, past_len, cfg["qk_rope_head_dim"]), dtype=np.float32))
            for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    on = kernel["trunk"].int8_matmuls + kernel["trunk"].nbits_matmuls
    print(f"{artifact}: {on} linears on the kernels, {threads} thread(s)")
    for s in (1, 2, 4, 64):
        fs = [io.trunk_feed(rng.integers(0, cfg["vocab_size"], (1, s)), (past_len + np.arange(s))[None],
                            np.ones((1, past_len + s), np.int64), past) for _ in range(3)]  # fmt: skip
        want, got = ort_ops["trunk"].run(fs[0])[0], kernel["trunk"].run(fs[0])[0]
        # what ONNX Runtime's own ops make of an input one ulp away: every cached latent nudged up
        latents = [io.past(i)[0] for i in range(cfg["num_hidden_layers"])]
        nudged = dict(fs[0], **{n: np.nextafter(fs[0][n], np.inf).astype(np.float32) for n in latents})
        itself = ort_ops["trunk"].run(nudged)[0]
        runs = {n: (lambda e=e: [e["trunk"].run(f) for f in fs] and len(fs))
                for n, e in (("ort", ort_ops), ("kernel", kernel))}  # fmt: skip
        ms = alternate(runs, rounds if s < 64 else max(2, rounds // 3))
        print(f"  {s} token(s): ONNX Runtime {ms['ort']:.2f} ms, kernels {ms['kernel']:.2f} ms "
              f"({ms['kernel'] / ms['ort']:.2f}x); logits {_apart(got, want):.1e} apart (ONNX Runtime with its cache "
              f"one ulp away: {_apart(itself, want):.1e})")  # fmt: skip
    kernel.close()
    ort_ops.close()


def _apart(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    if native.kernel_library() is None:
        raise SystemExit("nextn's kernels could not be built here (no C compiler): nothing to compare")
    for threads in (int(t) for t in a.threads.split(",")):
        for artifact in a.artifacts:
            trunk(artifact, threads, a.rounds)


if __name__ == "__main__":
    main()
