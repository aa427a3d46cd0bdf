"""llama.cpp beside nextn on the same checkpoint, built here from its Python package's sources (issue 14).

`llama-cpp-python` (pinned below) ships llama.cpp's whole source tree in its sdist (vendor/llama.cpp, commit
0c1e570: the one issue 14's table measured). Its wheel builds only the library, so this builds llama.cpp's own
`llama-bench` and `llama-quantize` from that tree with CMake (a C++ compiler, CMake and Ninja or Make needed;
x86 Linux: the ISA options come from /proc/cpuinfo),
converts a nextn checkpoint with llama.cpp's `convert_hf_to_gguf.py`, and quantizes it:

    llama = LlamaCpp.build(root)                        # once: pip download (sdist) + cmake, under root
    ggufs = llama.ggufs(checkpoint, root)               # {"f32", "q8_0", "q4_0"}: path, reused when present
    ms = llama.tpot_ms(ggufs["q4_0"], threads=1, depth=64, gen=64)   # llama-bench -d 64 -n 64, ms per token
    mb = gguf_read_mb(ggufs["q4_0"], top_k, n_experts)  # weight bytes one token reads

A random checkpoint has no tokenizer of its own: the embedded model's is borrowed (llama.cpp pads the vocabulary
to the checkpoint's size); the converter's pre-tokenizer check, which only labels the GGUF's tokenizer, is told
"default". Decode speed does not depend on the tokenizer. llama.cpp drops DeepSeek-V3's MTP layers (it cannot
draft with them for this architecture).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

PIN = "llama-cpp-python==0.3.36"
QUANTS = ("q8_0", "q4_0")  # llama.cpp's 8- and 4-bit formats beside nextn's int8 and int4
TOKENIZER = Path(__file__).resolve().parents[1] / "nextn" / "assets" / "stdlib-coder"

_CONVERT = """
import runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root)); sys.path.insert(1, str(root / "gguf-py"))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"  # only labels the GGUF's tokenizer
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")
"""


# ggml's CPU options for the instruction-set extensions this CPU reports (/proc/cpuinfo flags). Not
# GGML_NATIVE: on a CPU with AMX, -march=native compiles ggml's AMX path in, and at commit 0c1e570 llama-bench
# then aborts on this model (GGML_ASSERT(*cur_backend_id != -1), ggml-backend.cpp:1294); the x86 extensions
# llama.cpp's CPU kernels use are enabled one by one instead (what a build for this CPU without AMX gets).
ISA = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
       "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
       "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}  # fmt: skip


def isa_options() -> list[str]:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return ["-DGGML_NATIVE=OFF", *[f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in ISA.items()]]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        done = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}): see {log}")


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # llama.cpp's source tree (the sdist's vendor/llama.cpp)
    bin: Path  # its built tools

    @classmethod
    def build(cls, root: Path) -> LlamaCpp:
        """Download the pinned sdist and build llama-bench and llama-quantize once under root."""
        root.mkdir(parents=True, exist_ok=True)
        log = root / "build.log"
        build = root / "build"
        bin_dir = build / "bin"
        found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not found:
            print(f"downloading {PIN} (sdist) ...", flush=True)
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", root, PIN], log)
            with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tar:
                tar.extractall(root, filter="data")
            found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
        source = found[-1]
        if not (bin_dir / "llama-bench").is_file() or not (bin_dir / "llama-quantize").is_file():
            print("building llama.cpp's llama-bench and llama-quantize (several minutes) ...", flush=True)
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", source, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                  "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                  *isa_options()], log)  # fmt: skip
            _run(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "-j"], log)
        return cls(source, bin_dir)

    def ggufs(self, checkpoint: Path, root: Path) -> dict[str, Path]:
        """The checkpoint as f32 GGUF and quantized (QUANTS), made once under root."""
        out = {"f32": root / "model-f32.gguf", **{q: root / f"model-{q}.gguf" for q in QUANTS}}
        log = root / "convert.log"
        if not out["f32"].is_file():
            print("converting the checkpoint to GGUF ...", flush=True)
            folder = root / "checkpoint"  # the checkpoint's files beside the borrowed tokenizer
            folder.mkdir(exist_ok=True)
            for f in checkpoint.iterdir():
                if f.suffix in (".json", ".safetensors") and not (folder / f.name).exists():
                    (folder / f.name).symlink_to(f.resolve())
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(TOKENIZER / f, folder / f)
            script = root / "convert.py"
            script.write_text(_CONVERT)
            _run([sys.executable, script, self.source, folder, "--outfile", out["f32"], "--outtype", "f32"], log)
        for q in QUANTS:
            if not out[q].is_file():
                print(f"quantizing to {q} ...", flush=True)
                _run([self.bin / "llama-quantize", out["f32"], out[q], q.upper()], log)
        return out

    def tpot_ms(self, gguf: Path, threads: int, depth: int, gen: int, repetitions: int = 1) -> float:
        """llama-bench's decode of `gen` tokens after a context of `depth`: milliseconds per token."""
        cmd = [self.bin / "llama-bench", "-m", gguf, "-p", "0", "-n", str(gen), "-d", str(depth), "-t", str(threads),
               "-r", str(repetitions), "-o", "json"]  # fmt: skip
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama-bench failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        rows = json.loads(done.stdout)
        return 1e3 / rows[0]["avg_ts"]


def gguf_read_mb(gguf: Path, source: Path, top_k: int, n_experts: int) -> float:
    """Weight bytes one decoded token reads from a GGUF, in MB: every tensor, the routed experts' stacks at
    top_k / n_experts, the token embedding one row (as nextn/bench/floor.py counts nextn's graphs)."""
    sys.path.insert(0, str(source / "gguf-py"))
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(str(gguf)).tensors:
        n = float(t.n_bytes)
        if "_exps" in t.name:
            n *= top_k / n_experts
        elif t.name == "token_embd.weight":
            n /= int(t.shape[-1])  # GGUF shapes list the row length first: the last dim is the vocabulary
        total += n
    return total / 1e6
