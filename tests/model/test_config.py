"""config.json parsing: both rope styles, the transformers view of them, and clear errors."""

import pytest

from nextn.errors import NextnError
from nextn.model.config import config_from_hf, config_to_hf
from nextn.testing import tiny_config


@pytest.mark.parametrize("style", ["official", "hf"])
def test_round_trip_both_styles(style):
    cfg = tiny_config()
    assert config_from_hf(config_to_hf(cfg, style)) == cfg


def test_styles_agree_on_rope():
    cfg = tiny_config()
    official, hf = config_to_hf(cfg, "official"), config_to_hf(cfg, "hf")
    assert "rope_scaling" in official and "rope_parameters" not in official
    assert official["rope_scaling"]["type"] == "yarn" and hf["rope_parameters"]["rope_type"] == "yarn"
    assert config_from_hf(official).rope == config_from_hf(hf).rope


def test_official_deepseek_v3_fields():
    """The fields of DeepSeek-V3's own config.json (rope_scaling style, FP8 quantization_config)."""
    raw = {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "torch_dtype": "bfloat16", "eos_token_id": 1, "bos_token_id": 0,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }  # fmt: skip
    cfg = config_from_hf(raw)
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 40 and cfg.rope.original_max_position_embeddings == 4096
    assert cfg.rope.cos_sin_scale() == 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * __import__("math").log(40) + 1) ** 2)
    assert cfg.quant.block == (128, 128) and cfg.num_nextn_predict_layers == 1
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]


def test_rope_scaling_null_is_plain_rope():
    raw = config_to_hf(tiny_config(), "official")
    raw["rope_scaling"] = None
    assert config_from_hf(raw).rope.kind == "default"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "unknown model_type 'llama'"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"rope_scaling": {"type": "longrope", "factor": 2}}, "unsupported rope type 'longrope'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "unsupported quantization_config.quant_method 'gptq'"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "unsupported fp8 format 'e5m2'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1"),
        ({"n_group": 3}, "not a multiple of n_group=3"),
    ],
)
def test_bad_config_names_the_field(change, message):
    raw = config_to_hf(tiny_config(), "official")
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    with pytest.raises(NextnError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config_from_hf(raw, where="x/config.json")
