"""Checkpoint reading: layouts, FP8 dequantization, shared tensors, and one-line errors for bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextn.errors import NextnError
from nextn.model.checkpoint import Checkpoint, dequantize_fp8, quantize_fp8
from nextn.model.config import QuantConfig
from nextn.model.weights import load_model
from nextn.testing import tiny_config, write_random_checkpoint


def _logits(path, absorbed=False):
    model, _ = load_model(path, absorbed=absorbed)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)[None].expand(2, 9)
    with torch.no_grad():
        out = model(ids, pos)
        mtp = model.mtp_forward(0, ids[:, 1:], out.hidden[:, :-1], pos[:, 1:])
    return out.logits, mtp.logits


def test_sharded_equals_single_file(tmp_path):
    single = write_random_checkpoint(tmp_path / "single", tiny_config(), seed=3)
    sharded = write_random_checkpoint(tmp_path / "sharded", tiny_config(), seed=3, shard_bytes=50_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 5
    for a, b in zip(_logits(single), _logits(sharded)):
        assert torch.equal(a, b)


def _mapping_of(address: int) -> str:
    """The file behind the memory mapping that contains `address` ('' for anonymous memory)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


def test_weights_are_memory_mapped_not_copied(tiny_checkpoint):
    """fp32 weights loaded as fp32 live in a mapping of the file: no second copy in RAM."""
    model, _ = load_model(tiny_checkpoint)
    w = model.model.layers[1].self_attn.kv_b_proj.weight
    assert _mapping_of(w.data_ptr()) == str(tiny_checkpoint / "model.safetensors")
    bf16, _ = load_model(tiny_checkpoint, dtype=torch.bfloat16)  # converted: an ordinary allocation
    assert _mapping_of(bf16.model.layers[1].self_attn.kv_b_proj.weight.data_ptr()) != str(
        tiny_checkpoint / "model.safetensors"
    )


def test_mtp_embedding_and_head_kept_once(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    for m in model.mtp:
        assert m.embed_tokens.weight is model.model.embed_tokens.weight
        assert m.shared_head.head.weight is model.lm_head.weight


def test_mtp_keeps_its_own_head_when_it_differs(tmp_path):
    path = write_random_checkpoint(tmp_path / "c", tiny_config(num_nextn_predict_layers=1))
    tensors = load_file(str(path / "model.safetensors"))
    own = tensors["model.layers.3.shared_head.head.weight"] = torch.randn(256, 64)
    save_file(tensors, str(path / "model.safetensors"))
    model, _ = load_model(path)
    assert model.mtp[0].shared_head.head.weight is not model.lm_head.weight
    assert torch.equal(model.mtp[0].shared_head.head.weight, own)
    assert model.mtp[0].embed_tokens.weight is model.model.embed_tokens.weight


# -- FP8 -------------------------------------------------------------------------------------------
def _dequantize_by_loops(q: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk))
            out[blk] = q[blk].float() * s[i, j]
    return out


def test_fp8_block_quantization_with_edge_blocks():
    w = torch.randn(300, 200) * torch.linspace(0.1, 10, 200)  # columns of very different scale
    q, s = quantize_fp8(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    d = dequantize_fp8(q, s, (128, 128))
    assert torch.equal(d, _dequantize_by_loops(q, s, 128, 128))
    # e4m3 rounding: half an ulp of 3 mantissa bits (2^-4 relative) for normal values, half the
    # smallest subnormal (2^-10 in units of the block's scale) below that.
    scale = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((d - w).abs() <= bound).all()
    assert (d - w).abs().max() > 0  # it did quantize


@pytest.mark.parametrize("block", [(128, 128), (32, 48)])
def test_fp8_checkpoint_equals_its_dequantized_twin(tmp_path, block):
    """Loading FP8 (weight * scale_inv per block) gives exactly the logits of the dequantized weights."""
    cfg = tiny_config(quant=QuantConfig(block=block))
    fp8 = write_random_checkpoint(tmp_path / "fp8", cfg, weights="fp8")
    raw = load_file(str(fp8 / "model.safetensors"))
    assert sum(t.dtype == torch.float8_e4m3fn for t in raw.values()) > 50
    twin = tmp_path / "twin"
    twin.mkdir()
    dense = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            dense[name] = _dequantize_by_loops(t, raw[name + "_scale_inv"], *block)
        else:
            dense[name] = t.float()
    save_file(dense, str(twin / "model.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    (twin / "config.json").write_text(json.dumps(config))
    for absorbed in (False, True):
        for a, b in zip(_logits(fp8, absorbed), _logits(twin, absorbed)):
            assert torch.equal(a, b)


# -- bad input -------------------------------------------------------------------------------------
def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def _edit_config(path, fn):
    raw = json.loads((path / "config.json").read_text())
    fn(raw)
    (path / "config.json").write_text(json.dumps(raw))


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


BAD = {
    "no-config": (lambda p: (p / "config.json").unlink(), "config.json: missing"),
    "bad-json": (lambda p: (p / "config.json").write_text("{"), "config.json: not valid JSON"),
    "model-type": (lambda p: _edit_config(p, lambda c: c.update(model_type="qwen2")), "unknown model_type 'qwen2'"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index"),
    "missing-tensor": (
        lambda p: _edit_tensors(p, lambda t: t.pop("model.layers.2.mlp.gate.e_score_correction_bias")),
        "missing tensor model.layers.2.mlp.gate.e_score_correction_bias",
    ),
    "extra-tensor": (
        lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(3)})),
        "unexpected tensor model.layers.0.mlp.bias",
    ),
    "misshaped-tensor": (
        lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.4.eh_proj.weight": torch.zeros(64, 64)})),
        r"tensor model.layers.4.eh_proj.weight has shape \[64, 64\], expected \[64, 128\]",
    ),
    "unsupported-quant": (
        lambda p: _edit_config(p, lambda c: c.update(quantization_config={"quant_method": "awq"})),
        "unsupported quantization_config.quant_method 'awq'",
    ),
    "fp8-without-config": (
        lambda p: _edit_tensors(
            p, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.float8_e4m3fn)})
        ),
        "model.layers.0.mlp.up_proj.weight is FP8 but config.json has no quantization_config",
    ),
    "truncated": (_truncate, "model.safetensors: truncated safetensors file"),
    "corrupt-header": (lambda p: (p / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json" * 2),
                       "corrupt safetensors header"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_one_line_error(tiny_checkpoint, tmp_path, case):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    mutate, message = BAD[case]
    mutate(path)
    with pytest.raises(NextnError, match=message) as e:
        Checkpoint(path)
    assert "\n" not in str(e.value)


def test_missing_shard_and_fp8_scale(tmp_path):
    sharded = write_random_checkpoint(tmp_path / "s", tiny_config(), shard_bytes=50_000)
    sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(NextnError, match="shard listed in model.safetensors.index.json is missing"):
        Checkpoint(sharded)

    fp8 = write_random_checkpoint(tmp_path / "f", tiny_config(), weights="fp8")
    _edit_tensors(fp8, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(NextnError, match="o_proj.weight has no model.layers.1.self_attn.o_proj.weight_scale_inv"):
        Checkpoint(fp8)


def test_checkpoint_without_mtp_tensors_has_depth_zero(tmp_path):
    """A converted checkpoint that dropped the MTP layers but kept the config loads as trunk only."""
    path = write_random_checkpoint(tmp_path / "c", tiny_config())
    _edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(("model.layers.3.", "model.layers.4."))])
    assert Checkpoint(path).config.num_nextn_predict_layers == 0
    with pytest.raises(NextnError, match="has only 0 MTP module"):
        load_model(path, mtp_layers=1)


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, stored):
    """16-bit weights load exactly (upcast) as fp32, and as themselves without a copy."""
    path = write_random_checkpoint(tmp_path / stored, tiny_config(), weights=stored)
    raw = load_file(str(path / "model.safetensors"))
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    assert raw[name].dtype == getattr(torch, stored)
    as32, _ = load_model(path, dtype=torch.float32)
    assert torch.equal(as32.get_parameter(name), raw[name].float())
    assert as32.get_parameter("model.layers.2.mlp.gate.weight").dtype == torch.float32  # router stays fp32
    native, _ = load_model(path, dtype=getattr(torch, stored))
    assert torch.equal(native.get_parameter(name), raw[name])
    logits32 = as32(torch.tensor([[3, 4, 5]]), torch.arange(3)[None]).logits
    logits16 = native(torch.tensor([[3, 4, 5]]), torch.arange(3)[None]).logits
    assert (logits16.float() - logits32).abs().max() < 0.25  # same weights, 16-bit activations


def test_stacked_experts_are_the_only_copy_and_change_nothing(tiny_checkpoint):
    """load_model(stack_experts=True) (the fused MoE export): expert weights live in the MoE's stacks,
    gate/up interleaved, and the model computes exactly what the per-expert load does."""
    from nextn.model.reference import MoE

    plain, cfg = load_model(tiny_checkpoint)
    stacked, _ = load_model(tiny_checkpoint, stack_experts=True)
    moe = next(m for m in stacked.modules() if isinstance(m, MoE))
    w13, w2 = moe.fused_w13, moe.fused_w2
    assert w13.shape == (cfg.n_routed_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    for e, expert in enumerate(moe.experts):
        assert expert.gate_proj.weight.data_ptr() == w13[e, 0].data_ptr()  # views, not copies
        assert expert.up_proj.weight.data_ptr() == w13[e, 1].data_ptr()
        assert expert.down_proj.weight.data_ptr() == w2[e].data_ptr()
    for (n, a), (_, b) in zip(plain.state_dict().items(), stacked.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    pos = torch.arange(6)[None].expand(2, 6)
    with torch.no_grad():
        assert torch.equal(plain(ids, pos).logits, stacked(ids, pos).logits)
