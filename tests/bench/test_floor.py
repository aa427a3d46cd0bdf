"""Bytes a decode step reads, counted from the stored graphs, against the config's count and by hand."""

import numpy as np
import onnx
import pytest

from nextn.bench.floor import read_bandwidth, trunk_read_bytes
from nextn.bench.sweep import decode_read_bytes
from nextn.calib.calibrate import CalibOptions, calibrate_artifact
from nextn.export.manifest import read_manifest
from nextn.model.config import ModelConfig


def test_fp32_graph_reads_what_the_config_says(tiny_artifact):
    cfg = ModelConfig.from_dict(read_manifest(tiny_artifact, verify=False)["config"])
    got = trunk_read_bytes(tiny_artifact)
    assert sum(got.by_op.values()) == got.total
    # the graph also holds small constants (shapes, rotary frequencies) and the router's transposed copy
    # replaces the router: equal to the parameter count within a fraction of a percent
    assert got.total == pytest.approx(decode_read_bytes(cfg), rel=0.01)
    moe = onnx.load(str(tiny_artifact / "trunk.onnx"), load_external_data=False)
    dims = {t.name: t.dims for t in moe.graph.initializer}
    experts = sum(4 * np.prod(dims[n.input[i]]) for n in moe.graph.node if n.op_type == "MoE" for i in (2, 4))
    assert got.by_op["MoE"] == int(experts * cfg.num_experts_per_tok / cfg.n_routed_experts)


def test_int4_counts_its_packed_weights_scales_and_zero_points(tiny_artifact, tmp_path):
    data = tmp_path / "ids.ids"
    data.write_text("\n".join(" ".join(str(t) for t in range(2 + i, 26 + i)) for i in range(6)))
    out = tmp_path / "q"
    calibrate_artifact(tiny_artifact, out, [data], [], CalibOptions(scheme="int4", weight_method="rtn", samples=4,
                                                                    seq_len=24, eval_samples=1, min_top1=0.0,
                                                                    decode_report=False))  # fmt: skip
    got = trunk_read_bytes(out)
    model = onnx.load(str(out / "trunk.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nbits = 0
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":  # B uint8, scales fp32, zero points uint8
            b, s, z = (inits[i] for i in n.input[1:4])
            nbits += np.prod(b.dims) + 4 * np.prod(s.dims) + np.prod(z.dims)
    assert got.by_op["MatMulNBits"] == nbits
    assert got.total < trunk_read_bytes(tiny_artifact).total / 2
    # kv_b_proj: bf16 values in a quantized artifact, which the attention kernel reads in half the bytes
    assert got.by_op["MlaAttention"] == trunk_read_bytes(tiny_artifact).by_op["MlaAttention"] // 2


def test_a_bf16_checkpoints_weights_count_as_the_kernels_read_them(tmp_path):
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.testing import tiny_config, write_random_checkpoint

    art = {}
    for weights in ("float32", "bfloat16"):  # the same shapes, exported in fp32 both
        ckpt = write_random_checkpoint(tmp_path / weights, tiny_config(), weights=weights)
        export_checkpoint(ckpt, tmp_path / f"{weights}.onnx", ExportOptions())
        art[weights] = trunk_read_bytes(tmp_path / f"{weights}.onnx").by_op
    for op in ("MatMul", "MoE", "MlaAttention"):  # router products stay fp32: MatMul a little over half
        assert art["bfloat16"][op] < 0.55 * art["float32"][op] and art["bfloat16"][op] >= art["float32"][op] // 2, op
    assert art["bfloat16"]["Gather"] == art["float32"]["Gather"]  # the embedding is read by no kernel


def test_read_bandwidth_is_a_rate():
    assert 1e8 < read_bandwidth(1, nbytes=64 * 2**20, repeats=1) < 1e13
