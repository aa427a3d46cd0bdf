"""The terminal table, the JSON document and the PNG plot of a benchmark result."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def results_table(doc: dict):
    from rich.table import Table

    m = doc["machine"]
    threads = f"{m['threads_used']} thread(s)" if m["threads_used"] else "the backends' default threads"
    t = Table(title=f"nextn bench: {Path(doc['artifact']).name} ({doc['dtype']}) on {m['cpu']}, "
                    f"{threads} of {m['cores']} cores")  # fmt: skip
    for col in ("backend", "batch", "K", "TTFT ms", "TPOT ms", "token ms p50/p90/p99", "tok/s", "accept len",
                "accept per position", "vs K=0", "projected", "efficiency", "steps per K"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("backend", "accept per position", "steps per K") else "right")
    for r in doc["results"]:
        lat = r["token_latency_ms"]
        per_pos = " ".join(f"{a:.2f}" for a in r.get("accepted_per_position", [])) or "-"
        hist = " ".join(f"{k}:{n}" for k, n in r.get("draft_histogram", {}).items()) if r["draft"] == "auto" else "-"
        t.add_row(
            r["backend"], str(r["batch"]), str(r["draft"]), _f(r["ttft_ms"]["median"]), _f(r["tpot_ms"]["median"], "{:.3f}"),
            f"{_f(lat['median'], '{:.3f}')}/{_f(lat['p90'], '{:.3f}')}/{_f(lat['p99'], '{:.3f}')}",
            _f(r["tokens_per_s"]["median"], "{:.1f}"), _f(r.get("mean_acceptance_length")), per_pos,
            _f(r.get("speedup_vs_k0"), "{:.2f}x"), _f(r.get("projected_speedup"), "{:.2f}x"), _f(r.get("efficiency")), hist,
        )  # fmt: skip
    return t


def ratio_lines(doc: dict) -> list[str]:
    lines = []
    for q in doc["ratios"]:
        s = (f"{q['backend']} batch {q['batch']}: best K={q['best_draft']} is {q['best_speedup_vs_k0']:.2f}x "
             f"faster per token than K=0")  # fmt: skip
        if q.get("auto_vs_k0") is not None:
            s += f"; K=auto {q['auto_vs_k0']:.2f}x"
        if "vs_transformers" in q:
            s += f"; K=0 is {q['vs_transformers']:.2f}x faster than transformers generate"
        if "vs_transformers_mtp" in q:
            s += f"; K={q['best_draft']} is {q['vs_transformers_mtp']:.2f}x faster than generate(use_mtp=True)"
        lines.append(s + " (TPOT medians)")
    return lines


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(doc: dict, path: Path) -> None:
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def _figure():
    """A two-panel figure on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    return fig, axes


def _save(fig, path: Path, title: str) -> None:
    import io

    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_plot(doc: dict, path: Path) -> None:
    """Left: per-token latency (TPOT) against K, one line per (backend, batch), baselines dashed. Right: the
    speedup over K = 0, measured (solid) and projected from the run's step costs and acceptance (dashed).
    K = auto sits one step right of the largest fixed K."""
    fig, (ax1, ax2) = _figure()
    series: dict[tuple[str, int], list[dict]] = {}
    for r in doc["results"]:
        series.setdefault((r["backend"], r["batch"]), []).append(r)
    fixed = [r["draft"] for r in doc["results"] if r["draft"] != "auto"]
    auto_x = max(fixed, default=0) + 1

    def x(k) -> int:
        return auto_x if k == "auto" else k

    for (backend, batch), rows in series.items():
        rows = sorted(rows, key=lambda r: x(r["draft"]))
        ks = [x(r["draft"]) for r in rows]
        label = f"{backend}, batch {batch}"
        style = dict(marker="o") if not backend.startswith("transformers") else dict(marker="s", linestyle="--")
        line = ax1.plot(ks, [r["tpot_ms"]["median"] for r in rows], label=label, **style)[0]
        if any(r.get("projected_speedup") for r in rows):
            ax2.plot(ks, [r["speedup_vs_k0"] for r in rows], marker="o", color=line.get_color(), label=f"{label}: measured")
            ax2.plot(ks, [r["projected_speedup"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                     label=f"{label}: projected")  # fmt: skip
    ticks = sorted(set(fixed)) + ([auto_x] if any(r["draft"] == "auto" for r in doc["results"]) else [])
    ax1.set(xlabel="draft tokens per step (K)", ylabel="per-token latency, TPOT median (ms)", yscale="log")
    ax2.set(xlabel="draft tokens per step (K)", ylabel="speedup over K=0 (TPOT)")
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.set_xticks(ticks, [("auto" if k == auto_x and k not in fixed else str(k)) for k in ticks])
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    _save(fig, path, f"{Path(doc['artifact']).name}: {doc['machine']['cpu']}, {doc['machine']['threads_used']} thread(s)")


def write_sweep_plot(doc: dict, path: Path) -> None:
    """Projected speedup against model size, one line per K; verify and MTP cost beside it."""
    rows = [r for r in doc["rows"] if r["size"] != "embedded"]
    params = [r["parameters"]["total"] / 1e6 for r in rows]
    fig, (ax1, ax2) = _figure()
    for k in sorted({k for r in rows for k in r["projected_speedup"]}, key=int):
        ax1.plot(params, [r["projected_speedup"][k] for r in rows], marker="o", label=f"K={k}")
        ax2.plot(params, [r["verify_cost"][k] for r in rows], marker="o", label=f"verify {int(k) + 1} tokens / 1")
    ax2.plot(params, [r["mtp_cost"] for r in rows], marker="s", linestyle="--", label="MTP module / trunk")
    ax1.set(xscale="log", xlabel="parameters (M)", ylabel="projected speedup over K=0")
    ax2.set(xscale="log", xlabel="parameters (M)", ylabel="cost relative to a 1-token trunk step")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, f"model-size sweep: {doc['machine']['cpu']}, {doc['machine']['threads_used']} thread(s)")
