"""What `nextn inspect ARTIFACT` and `nextn export` print about an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextn.export.manifest import read_manifest


def summarize_artifact(path: str | Path) -> dict[str, Any]:
    m = read_manifest(path)
    cfg = m["config"]
    return {
        "path": str(Path(path)),
        "kind": "artifact",
        "dtype": m["dtype"],
        "opset": m["opset"],
        "attention": m["attention"],
        "moe": m.get("moe", "sparse"),  # artifacts of nextn < 0.2 have only the per-expert form
        "mtp_depth": cfg["num_nextn_predict_layers"],
        "model": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "kv_lora_rank",
                                       "qk_rope_head_dim", "n_routed_experts")},  # fmt: skip
        "graphs": {
            name: {"file": g["file"], "bytes": m["files"][g["file"]]["bytes"], "inputs": g["inputs"],
                   "outputs": g["outputs"]}  # fmt: skip
            for name, g in m["graphs"].items()
        },
        "weights": m["weights"],
        "files": m["files"],
        "total_bytes": sum(f["bytes"] for f in m["files"].values()),
        "validation": worst_errors(m),
        "eos_token_ids": m["eos_token_ids"],
        "tokenizer": m["tokenizer"],
        "tools": m["tools"],
        "quantization": quantization_summary(m),
    }


def quantization_summary(m: dict) -> dict | None:
    """Scheme per graph and the headline figures of the quality report; None for an unquantized artifact."""
    q = m.get("quantization")
    if not q:
        return None
    rep = q.get("report") or {}
    trunk = rep.get("trunk") or {}
    return {
        "graphs": {g: d["scheme"] for g, d in q["graphs"].items()},
        "details": q["graphs"],
        "top1_agreement": trunk.get("top1_agreement"),
        "kl_mean": trunk.get("kl_mean"),
        "source_artifact": q.get("source_artifact"),
    }


def worst_errors(manifest: dict) -> list[dict]:
    """The largest error of each (graph, output) over the validation shapes."""
    worst: dict[tuple[str, str], dict] = {}
    for r in manifest["validation"]:
        key = (r["graph"], r["output"])
        if key not in worst or r["max_abs"] > worst[key]["max_abs"]:
            worst[key] = r
    return [
        {"graph": g, "output": o, "max_abs": r["max_abs"], "max_rel": r["max_rel"], "bound": r["bound"]}
        for (g, o), r in worst.items()
    ]


def format_validation(manifest: dict) -> str:
    shapes = sorted({(r["batch"], r["new_tokens"], r["past_len"]) for r in manifest["validation"]})
    scope = manifest.get("validation_scope", "full")
    lines = [f"validation vs PyTorch reference ({manifest['dtype']}; {scope}; (batch, new, past) in {shapes}):"]
    for r in worst_errors(manifest):
        lines.append(f"  {r['graph']:<9} {r['output']:<11} max abs {r['max_abs']:.2e}  max rel {r['max_rel']:.2e}"
                     f"  (bound {r['bound']:.1e})")  # fmt: skip
    return "\n".join(lines)


def _shape(spec: dict) -> str:
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"


def _scheme(d: dict) -> str:
    if d["scheme"] == "int4":
        return f"int4 (MatMulNBits, block {d['block_size']}, head {d['head_bits']}-bit, {d['linears']} linears)"
    if d["scheme"] in ("int8", "fp8"):
        return f"{d['scheme']} Q/DQ ({d['method']}, {d['linears']} linears)"
    return d["scheme"]


def format_artifact(s: dict) -> str:
    from nextn.cli import _bytes

    lines = [
        f"artifact    {s['path']}  ({s['dtype']}, opset {s['opset']}, MLA {s['attention']}, MoE {s['moe']}, "
        f"{_bytes(s['total_bytes'])} in {len(s['files'])} files)",
        f"model       {s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}, "
        f"vocab {s['model']['vocab_size']}, MTP depth {s['mtp_depth']}",
        f"weights     {s['weights']['file']} {_bytes(s['weights']['bytes'])}: {s['weights']['tensors']} tensors "
        f"for {s['weights']['references']} initializers; shared between graphs: {', '.join(s['weights']['shared']) or 'none'}",
    ]
    from nextn.export import io as kv_io

    for name, g in s["graphs"].items():
        lines.append(f"graph       {g['file']} ({_bytes(g['bytes'])})")
        io = [*(("in ", x) for x in g["inputs"]), *(("out", x) for x in g["outputs"])]
        for direction, spec in io:
            if ".c_kv" in spec["name"] or ".k_pe" in spec["name"]:
                if spec["name"] not in (*kv_io.past(0), *kv_io.new(0), *kv_io.past(), *kv_io.new()):
                    continue  # one layer's cache stands for all
            lines.append(f"  {direction} {spec['name']:<16} {spec['dtype']:<8} {_shape(spec)}")
    q = s.get("quantization")
    if q:
        schemes = ", ".join(f"{g} {_scheme(d)}" for g, d in q["details"].items())
        lines.append(f"quantized   {schemes}; trunk top-1 agreement with fp32 {q['top1_agreement']:.4f}, "
                     f"KL {q['kl_mean']:.2e} (quality_report.json)")  # fmt: skip
    else:
        lines.append("validation  " + "; ".join(f"{r['graph']} {r['output']} {r['max_abs']:.1e}" for r in s["validation"]))
    lines.append(f"tokenizer   {s['tokenizer'] or 'none'}; EOS ids {s['eos_token_ids']}")
    return "\n".join(lines)
