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


def optimize_graph(model: ir.Model, iterations: int = 2) -> None:
    """Fold constants, apply the single-output rewrite rules, clean up, fuse; in place."""
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
