"""Malformed HF checkpoints and configs are refused with an error naming the culprit; exports
are atomic; the hub ``config.json`` dialect loads. Tiny, fp32, CPU; nothing is downloaded."""

import json
import os
import shutil

import pytest
import torch
from hf_testing import (
    assert_checkpoints_equal,
    assert_states_equal,
    read_config,
    read_dir,
    write_dir,
)

import mimo_jax
from mimo_jax import hf
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE
from mimo_jax.hf_config import config_from_hf
from notebooks.synthetic_checkpoint import random_model

# ---------------------------------------------------------------------------------------------
# 1. Malformed input.


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A valid 3-layer checkpoint with one MTP block; tests copy and corrupt it."""
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1)
    model = random_model(cfg, seed=7)
    path = tmp_path_factory.mktemp("small") / "ckpt"
    hf.save_hf(model, path)
    return path


Q = "model.layers.2.self_attn.q_proj.weight"


def _fp8(t):
    return t.to(torch.float8_e4m3fn)


def _ones_scale(t):
    return torch.ones(-(-t.shape[0] // 128), -(-t.shape[1] // 128))


TENSOR_CORRUPTIONS = {
    "missing": (lambda t: t.pop(Q), Q),
    "extra": (
        lambda t: t.__setitem__("model.layers.1.mlp.experts.99.up_proj.weight", torch.zeros(3)),
        "model.layers.1.mlp.experts.99.up_proj.weight",
    ),
    "misshaped": (
        lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(47, 64)),
        "model.layers.1.self_attn.k_proj.weight",
    ),
    "int32": (
        lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].int()),
        "model.norm.weight",
    ),
    "fp8_without_scale": (lambda t: t.__setitem__(Q, _fp8(t[Q])), Q),
    "fp8_never_quantized": (
        lambda t: t.update(
            {
                "lm_head.weight": _fp8(t["lm_head.weight"]),
                "lm_head.weight_scale_inv": torch.ones(2, 1),
            }
        ),
        "lm_head.weight",
    ),
    "fp8_bad_scale_shape": (
        lambda t: t.update({Q: _fp8(t[Q]), Q + "_scale_inv": torch.ones(2, 1)}),
        Q + "_scale_inv",
    ),
    "fp8_scale_not_f32": (
        lambda t: t.update({Q: _fp8(t[Q]), Q + "_scale_inv": _ones_scale(t[Q]).bfloat16()}),
        Q + "_scale_inv",
    ),
    "scale_on_unquantized": (lambda t: t.update({Q + "_scale_inv": _ones_scale(t[Q])}), Q),
    "orphan_scale": (
        lambda t: t.update({"model.layers.9.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)}),
        "model.layers.9.self_attn.q_proj.weight_scale_inv",
    ),
}


@pytest.mark.parametrize("kind", list(TENSOR_CORRUPTIONS))
def test_bad_tensor_is_named(kind, small_ckpt, tmp_path):
    corrupt, culprit = TENSOR_CORRUPTIONS[kind]
    tensors = read_dir(small_ckpt)
    corrupt(tensors)
    write_dir(tmp_path / "bad", tensors, read_config(small_ckpt))
    with pytest.raises(ValueError) as exc:
        hf.load_hf(str(tmp_path / "bad"))
    assert culprit in str(exc.value), str(exc.value)


def _hub_layers(config):
    config.pop("layer_types"), config.pop("mlp_layer_types")
    config["hybrid_layer_pattern"] = [0, 1, 2]
    config["sliding_window_size"] = config.pop("sliding_window") - 1


CONFIG_CORRUPTIONS = {
    "layer_types_length": (
        lambda c: c.__setitem__("layer_types", c["layer_types"][:2]),
        "layer_types",
    ),
    "mlp_layer_types_entry": (
        lambda c: c.__setitem__("mlp_layer_types", ["dense", "moe", "sparse"]),
        "mlp_layer_types",
    ),
    "hybrid_layer_pattern_2": (_hub_layers, "hybrid_layer_pattern"),
    # Claims two MTP blocks; the checkpoint has one.
    "mtp_count": (
        lambda c: c.__setitem__("num_nextn_predict_layers", 2),
        "model.mtp.layers.1.",
    ),
}


@pytest.mark.parametrize("kind", list(CONFIG_CORRUPTIONS))
def test_bad_config_is_named(kind, small_ckpt, tmp_path):
    corrupt, culprit = CONFIG_CORRUPTIONS[kind]
    shutil.copytree(small_ckpt, tmp_path / "bad")
    config = read_config(small_ckpt)
    corrupt(config)
    with open(tmp_path / "bad" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError) as exc:
        hf.load_hf(str(tmp_path / "bad"))
    assert culprit in str(exc.value), str(exc.value)


def test_mtp_numbering_gap_is_rejected(small_ckpt, tmp_path):
    tensors = read_dir(small_ckpt)
    tensors = {
        n.replace("model.mtp.layers.0.", "model.mtp.layers.1."): t for n, t in tensors.items()
    }
    config = read_config(small_ckpt)
    del config["num_nextn_predict_layers"]
    write_dir(tmp_path / "bad", tensors, config)
    with pytest.raises(ValueError, match="MTP layers"):
        hf.load_hf(str(tmp_path / "bad"))


def test_save_refuses_existing_dir_and_overwrites_on_request(small_ckpt, tmp_path):
    model = random_model(mimo_jax.tiny(num_layers=3, num_mtp_layers=1), seed=8)
    target = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, target)
    before = read_dir(target)
    with pytest.raises(FileExistsError, match="ckpt"):
        hf.save_hf(model, target)
    after = read_dir(target)
    assert all(torch.equal(before[n], after[n]) for n in before), "refused save touched the dir"

    hf.save_hf(model, target, overwrite=True)
    assert_states_equal(model, hf.load_hf(str(target)))
    assert os.listdir(tmp_path) == ["ckpt"], os.listdir(tmp_path)
    # A plain mkdir's permissions, not mkdtemp's private 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("existing", [False, True])
def test_failed_export_leaves_nothing_behind(existing, small_ckpt, tmp_path, monkeypatch):
    model = random_model(mimo_jax.tiny(num_layers=3, num_mtp_layers=1), seed=9)
    parent = tmp_path / "parent"
    parent.mkdir()
    target = parent / "ckpt"
    if existing:
        shutil.copytree(small_ckpt, target)
    real_save, calls = hf.save_file, []

    def failing_save(tensors, filename, **kw):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(tensors, filename, **kw)

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        hf.save_hf(model, target, max_shard_bytes=50_000, overwrite=existing)
    assert len(calls) == 2, calls
    if existing:
        assert os.listdir(parent) == ["ckpt"], os.listdir(parent)
        assert_checkpoints_equal(small_ckpt, target)
    else:
        assert os.listdir(parent) == [], os.listdir(parent)


# ---------------------------------------------------------------------------------------------
# 2. The hub config.json dialect.


def _hub_config(n: int, window: int) -> dict:
    """A hub-style (remote-code) config.json for a tiny model, with the model keys of the released
    ``XiaomiMiMo/MiMo-V2-Flash`` config.json (not its quantization_config or auto_map)."""
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": n,
        "intermediate_size": 160,
        "moe_intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 24,
        "v_head_dim": 16,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 24,
        "swa_v_head_dim": 16,
        "rope_theta": 5_000_000,
        "swa_rope_theta": 10_000,
        "partial_rotary_factor": 0.334,
        "rope_scaling": None,
        # The hub counts previous tokens only; all three keys carry the same number.
        "sliding_window": window - 1,
        "sliding_window_size": window - 1,
        "attention_chunk_size": window - 1,
        "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(n)],
        "hybrid_block_size": None,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "moe_layer_freq": [0] + [1] * (n - 1),
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "hidden_act": "silu",
        "layernorm_epsilon": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def test_hub_config_dialect():
    cfg = config_from_hf(_hub_config(13, window=129))
    assert cfg.sliding_window == 129
    assert cfg.layer_types == tuple(FULL if i in (0, 5, 11) else SLIDING for i in range(13)), (
        cfg.layer_types
    )
    assert cfg.mlp_layer_types == (DENSE,) + (SPARSE,) * 12
    assert (cfg.num_kv_heads, cfg.swa_num_kv_heads) == (1, 2)
    assert (cfg.rope_theta, cfg.swa_rope_theta) == (5e6, 1e4)
    assert (cfg.swa_attention_sink, cfg.full_attention_sink) == (True, False)
    assert cfg.attention_value_scale == 0.707
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.routed_scaling_factor == 1.0
    assert cfg.num_mtp_layers == 0  # not stated: load_hf counts the tensors
    assert cfg.rotary_dim == 8


def test_load_with_hub_config_json(tmp_path):
    """A checkpoint whose config.json is in the hub dialect loads into the same model."""
    cfg = mimo_jax.tiny(num_layers=7, num_mtp_layers=1, sliding_window=129)
    model = random_model(cfg, seed=10)
    hf.save_hf(model, tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "config.json", "w") as f:
        json.dump(_hub_config(7, window=129), f)
    back = hf.load_hf(str(tmp_path / "ckpt"))
    assert back.cfg == cfg, (back.cfg, cfg)
    assert_states_equal(model, back)
