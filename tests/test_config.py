"""ModelConfig: validation messages, HF dialects, presets, and the real model's size."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE, ModelConfig, layer_pattern
from mimo_jax.hf_config import config_from_hf, config_to_hf


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_real_config_parameter_counts():
    cfg = mimo_jax.mimo_v2_flash()
    assert cfg.layer_types.count(FULL) == 9 and cfg.layer_types.count(SLIDING) == 39
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == [
        0,
        5,
        11,
        17,
        23,
        29,
        35,
        41,
        47,
    ]
    assert cfg.rotary_dim == 64 and cfg.sliding_window == 129
    model = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    # Everything is abstract: nothing was allocated.
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    total_with_mtp = _count(params)
    mtp = _count(nnx.state(model.mtp, nnx.Param))
    total = total_with_mtp - mtp
    # Active: everything but the experts not chosen (8 of 256 per MoE layer).
    experts = sum(
        _count(nnx.state(m.mlp, nnx.Param)) - _count(nnx.state(m.mlp.router, nnx.Param))
        for m in list(model.layers) + list(model.scanned)
        if m.is_moe
    )
    active = total - experts * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    print(
        f"MiMo-V2-Flash: total {total / 1e9:.2f}B, active {active / 1e9:.2f}B, MTP {mtp / 1e9:.2f}B"
    )
    assert abs(total / 308.7e9 - 1) < 0.005, total
    assert abs(active / 15.4e9 - 1) < 0.005, active
    assert abs(mtp / 3 / 0.33e9 - 1) < 0.02, mtp


def test_presets_build_and_plan():
    cfg = mimo_jax.tiny()
    plan = mimo_jax.layer_plan(cfg)
    assert (plan.start, plan.period, plan.repeats) == (1, 6, 2)
    real = mimo_jax.layer_plan(mimo_jax.mimo_v2_flash())
    assert (real.start, real.period, real.repeats) == (6, 6, 7)  # layers 0-5 unrolled
    assert mimo_jax.layer_plan(cfg.replace(scan_layers=False)).repeats == 0


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(layer_types=(FULL, "local")), "layer_types"),
        (dict(mlp_layer_types=(DENSE,) * 3), "mlp_layer_types"),
        (dict(mlp_layer_types=(DENSE, "moe")), "mlp_layer_types"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(swa_num_kv_heads=3), "swa_num_kv_heads"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_expert_groups=3), "num_expert_groups"),
        (dict(num_expert_groups=4, topk_groups=5), "topk_groups"),
        (dict(num_expert_groups=4, topk_groups=1, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
        (dict(moe_impl="sparse"), "moe_impl"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(dtype="int8"), "dtype"),
        (dict(embed_dim=-4), "embed_dim"),
    ],
)
def test_invalid_config_names_the_field(change, field):
    base = dict(layer_types=(FULL, SLIDING), mlp_layer_types=(DENSE, SPARSE), num_layers=2)
    kw = {**base, **change}
    n = kw.pop("num_layers")
    del n
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        mimo_jax.tiny(**kw)


def test_native_round_trip():
    cfg = mimo_jax.tiny(num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5)
    hf = config_to_hf(cfg)
    back = config_from_hf(hf, dtype="float32", param_dtype="float32")
    skip = {"dtype", "param_dtype", "attention_impl", "moe_impl", "scan_layers", "remat"}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in skip:
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name


def test_native_keys_match_transformers():
    from transformers import MiMoV2FlashConfig

    cfg = mimo_jax.tiny()
    tcfg = MiMoV2FlashConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    back = config_from_hf(tcfg.to_dict(), dtype="float32", param_dtype="float32")
    assert back.layer_types == cfg.layer_types and back.sliding_window == cfg.sliding_window
    assert back.swa_num_kv_heads == cfg.swa_num_kv_heads and back.num_mtp_layers == 3


def test_layer_pattern_and_defaults_are_the_released_models():
    cfg = mimo_jax.mimo_v2_flash()
    assert (cfg.layer_types, cfg.mlp_layer_types) == layer_pattern(48)
    swa, full = (SLIDING,) * 4, (FULL,)
    assert layer_pattern(7) == (full + swa + full + (SLIDING,), (DENSE,) + (SPARSE,) * 6)
    assert layer_pattern(4, global_every=2, num_dense_layers=2) == (
        (FULL, FULL, SLIDING, FULL),
        (DENSE, DENSE, SPARSE, SPARSE),
    )
    # The ml_collections form and a config.json without pattern or rope keys build the same.
    assert mimo_jax.config.from_config_dict({"num_layers": 48}) == cfg
    dropped = ("layer_types", "mlp_layer_types", "rope_parameters", "sliding_window")
    native = {k: v for k, v in config_to_hf(cfg).items() if k not in dropped}
    del native["max_position_embeddings"]
    back = config_from_hf(native, num_mtp_layers=cfg.num_mtp_layers, param_dtype=cfg.param_dtype)
    assert back == cfg


def test_hub_keys():
    hub = {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "swa_num_attention_heads": 8,
        "swa_num_key_value_heads": 4,
        "head_dim": 24,
        "v_head_dim": 16,
        "swa_head_dim": 24,
        "swa_v_head_dim": 16,
        "hybrid_layer_pattern": [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0],
        "moe_layer_freq": [0] + [1] * 11,
        "sliding_window": 128,
        "sliding_window_size": 128,
        "rope_theta": 5e6,
        "swa_rope_theta": 1e4,
        "partial_rotary_factor": 0.334,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "layernorm_epsilon": 1e-6,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "tie_word_embeddings": False,
    }
    cfg = config_from_hf(hub)
    assert cfg.sliding_window == 129
    assert (
        cfg.layer_types[0] == FULL and cfg.layer_types[5] == FULL and cfg.layer_types[6] == SLIDING
    )
    assert cfg.mlp_layer_types == (DENSE,) + (SPARSE,) * 11
    assert cfg.swa_num_kv_heads == 4 and cfg.rms_norm_eps == 1e-6
    assert cfg.routed_scaling_factor == 1.0 and cfg.num_mtp_layers == 0
    with pytest.raises(ValueError, match="hybrid_layer_pattern"):
        config_from_hf({**hub, "hybrid_layer_pattern": [0, 1]})
    with pytest.raises(ValueError, match="swa_head_dim"):
        config_from_hf({**hub, "swa_head_dim": 32})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf({k: v for k, v in hub.items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match="swa_num_kv_heads"):
        config_to_hf(config_from_hf({**hub, "swa_num_key_value_heads": 6}))
