"""What keeping routers, softmax, residuals and masks in float is worth (BENCHMARKS.md, issue 7).

    python benchmarks/quantize_everything.py linears|routers|all

int8 Q/DQ (minmax) on the embedded model's trunk only, MTP graphs left fp32, then top-1 agreement, KL and
perplexity against the fp32 artifact on 8 held-out stdlib sequences:
  linears   what `nextn calibrate --scheme int8` quantizes
  routers   the linears and the MoE routers
  all       the linears, plus a Q/DQ pair after every other float activation of the graph
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

from nextn.calib import observe, report
from nextn.calib.data import calibration_and_eval
from nextn.calib.rewrite import Linear, apply_qdq, find_linears
from nextn.embedded import embedded_artifact
from nextn.export.manifest import read_manifest, write_manifest
from nextn.export.writer import pack_weights
from nextn.runtime.engines import SharedWeights, open_engines


def main(variant: str) -> None:
    root = embedded_artifact()
    manifest = read_manifest(root)
    cal, ev = calibration_and_eval([], [], Tokenizer.from_file(str(root / "tokenizer.json")),
                                   manifest["config"]["vocab_size"], 16, 256, 8)  # fmt: skip
    graph = onnx.load(str(root / "trunk.onnx"), load_external_data=False)
    linears, routers = find_linears(graph)
    if variant == "routers":
        nodes = {n.name: n for n in graph.node}
        for name in routers:
            node = nodes[name]
            w = next(t for t in graph.initializer if t.name == node.input[1])
            linears.append(Linear(name, node.op_type, node.input[0], w.name, int(w.dims[1]), int(w.dims[0]), True))
    probed = {lin.x for lin in linears}
    if variant == "all":
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.value_info, *graph.graph.output]}
        probed |= {o for n in graph.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT}
    out = Path(tempfile.mkdtemp(prefix="nextn-qall-"))
    try:
        probe = observe.open_probe("trunk", root / "trunk.onnx", sorted(probed), SharedWeights(root / "weights.bin"),
                                   out / "probe", 1)  # fmt: skip
        stats = {p: observe.TensorStats() for p in probed}

        def visit(_, arrays):
            for p, x in arrays.items():
                if x.dtype == np.float32:
                    stats[p].update_range(x, hessian=False)

        observe.drive({"trunk": probe}, {**manifest["config"], "num_nextn_predict_layers": 0}, cal.ids, visit)
        shutil.rmtree(out / "probe")
        amax = {p: s.amax for p, s in stats.items() if s.rows and s.amax > 0}
        model = onnx.load(str(root / "trunk.onnx"))
        used = [lin for lin in linears if lin.x in amax]
        apply_qdq(model, used, amax, "int8")
        if variant == "all":
            _qdq_every_activation(model, {p: a for p, a in amax.items() if p not in {lin.x for lin in used}})
        files = [out / "trunk.onnx"]
        onnx.save_model(model, str(files[0]), save_as_external_data=True, location="trunk.onnx.data")
        for name in manifest["graphs"]:
            if name != "trunk":
                files.append(out / f"{name}.onnx")
                onnx.save_model(onnx.load(str(root / f"{name}.onnx")), str(files[-1]), save_as_external_data=True,
                                location=f"{name}.onnx.data")  # fmt: skip
        pack_weights(files, out / "weights.bin")
        shutil.copy(root / "tokenizer.json", out / "tokenizer.json")
        write_manifest(out, dict(manifest))
        with open_engines(root) as base, open_engines(out) as quant:
            r = report.agreement(base, quant, ev.ids, manifest["config"])
        print(f"{variant}: {len(used)} linears, {len(amax)} activations Q/DQ'd: top-1 {r['top1_agreement']:.4f}, "
              f"KL mean {r['kl_mean']:.4f} p99 {r['kl_p99']:.3f}, perplexity {r['perplexity_fp32']:.2f} -> "
              f"{r['perplexity']:.2f} ({r['positions']} positions)")  # fmt: skip
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _qdq_every_activation(model: onnx.ModelProto, amax: dict[str, float]) -> None:
    """A Q/DQ pair (uint8, zero point 128, scale amax/127) after each of these activations; readers take it."""
    nodes, inits = [], []
    for node in model.graph.node:
        node.input[:] = [f"{x}_adq" if x in amax else x for x in node.input]
        nodes.append(node)
        for o in node.output:
            if o in amax:
                inits += [numpy_helper.from_array(np.asarray(np.float32(amax[o] / 127)), f"{o}_as"),
                          numpy_helper.from_array(np.asarray(128, np.uint8), f"{o}_az")]  # fmt: skip
                nodes += [helper.make_node("QuantizeLinear", [o, f"{o}_as", f"{o}_az"], [f"{o}_aq"]),
                          helper.make_node("DequantizeLinear", [f"{o}_aq", f"{o}_as", f"{o}_az"], [f"{o}_adq"])]  # fmt: skip
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "linears")
