"""Graph optimization after export: onnxscript's optimizer minus its one quadratic rule.

torch.onnx's built-in `optimize=True` runs onnxscript's default pipeline (constant folding, ~45
rewrite rules, dead-code removal, initializer deduplication, CSE). One rule, `SlicesSplit`, matches a
pattern with several output nodes by trying every combination of same-typed nodes in the graph:
O(nodes^2) per attempt. On a 12-layer MoE trunk (thousands of nodes, per-expert Slice/Gather) it took
over 5 of the 6 minutes of an export; without it the pipeline produces the same graph size here
(measured in BENCHMARKS.md). Everything else is the stock pipeline, standard ONNX ops only.
"""

from __future__ import annotations

import gc

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.rewriter import onnx_fusions
from onnxscript.optimizer import _constant_folding

# onnxscript 0.7.2 keeps its default rules and folding pass private (the version is pinned).
_RULES = tuple(
    r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "_target_pattern", None) is None
    or r._target_pattern.has_single_output_node
)  # fmt: skip


# Constant folding combines initializers of at most this many elements; larger ones only by Transpose
# (onnxscript's always-fold op). The streaming export relies on this split (stream.py).
FOLD_INPUT_LIMIT = 8192
MS_DOMAIN = "com.microsoft"


def optimize_graph(model: ir.Model, iterations: int = 2, onnxruntime_ops: bool = False) -> None:
    """Fold constants, apply the single-output rewrite rules, clean up, fuse; in place. `onnxruntime_ops`
    (graphs that already need ONNX Runtime's contrib ops): also fuse_skip_norms."""
    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True, input_size_limit=FOLD_INPUT_LIMIT, output_size_limit=262144
                ),
                rewriter.RewritePass(_RULES),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=iterations,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model)
    # Standard-op fusions of recent opsets (RMSNormalization at opset 23), as torch.onnx applies them.
    onnx_fusions.fuse(model)
    release_rewriter_state()
    if onnxruntime_ops:
        fuse_skip_norms(model)


def fuse_skip_norms(model: ir.Model) -> int:
    """Every residual Add feeding an RMSNormalization becomes one com.microsoft.SkipSimplifiedLayerNormalization;
    returns how many. ONNX Runtime does not fuse these itself (it fuses the LayerNormalization form only):

        a, b [B, S, H] ─ Add ─ sum ─ RMSNormalization(gamma) ─ y       a, b ─ SkipSimplifiedLayerNormalization(gamma)
                                └─ (the residual stream)           ->        ─ y, sum (output 3; outputs 1, 2 absent)

    Same arithmetic (the sum, then the norm in fp32), one node and one pass over the activations fewer per
    norm: 2 a decoder layer. fp32 graphs only, operands of one static shape (no broadcasting)."""
    fused = 0
    for norm in list(model.graph):
        if norm.op_type != "RMSNormalization" or norm.domain != "" or len(norm.inputs) != 2:
            continue
        add, eps = norm.inputs[0].producer(), norm.attributes.get("epsilon")
        if (add is None or add.op_type != "Add" or add.domain != "" or norm.attributes.get_int("axis", -1) != -1
                or eps is None or norm.attributes.get_int("stash_type", 1) != 1):  # fmt: skip
            continue
        a, b = add.inputs
        if a.shape != b.shape or any(v.dtype != ir.DataType.FLOAT or v.shape is None or v.is_initializer()
                                     for v in (a, b)):  # fmt: skip
            continue
        outputs = [ir.Value(name=norm.outputs[0].name + "_skip"), ir.Value(name=""), ir.Value(name=""),
                   ir.Value(name=add.outputs[0].name + "_skip")]  # fmt: skip
        skip = ir.node("SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], {"epsilon": eps.as_float()},
                       domain=MS_DOMAIN, outputs=outputs)  # fmt: skip
        model.graph.insert_before(add, skip)
        for old, new in ((norm.outputs[0], outputs[0]), (add.outputs[0], outputs[3])):
            new.shape, new.dtype = a.shape, a.dtype  # both as the operands: [B, S, H] float
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = f"{name}_unfused", name  # a graph output keeps its name
        model.graph.remove([norm, add], safe=True)
        fused += 1
    if fused:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused


def release_rewriter_state() -> None:
    """Forget the last graph onnxscript's pattern matchers saw.

    The rewrite rules are module-level objects and each matcher keeps a reference to the last graph
    and node it matched. That graph's values wrap the torch parameters the model was exported from,
    so without this an export would pin every weight in memory until the next export replaced it.
    """
    from onnxscript.rewriter import _matcher

    for obj in gc.get_objects():
        if isinstance(obj, _matcher.SimplePatternMatcher):
            for attr in ("_graph", "_current_node", "_match", "_tracer"):
                obj.__dict__.pop(attr, None)
