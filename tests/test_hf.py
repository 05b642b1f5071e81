"""Checkpoint I/O (mimo_jax.hf) against transformers' MiMoV2FlashForCausalLM and the hub format.

Covers: logits parity after importing a random tiny transformers model, export that
transformers loads with the same logits, bit-exact import/export round trips including the MTP
blocks, sharded export, FP8 block-quantized import. (Malformed checkpoints, atomic export and
the hub ``config.json`` dialect: test_hf_errors.py.) Everything is tiny, fp32 and on CPU;
nothing is downloaded.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_testing import (
    assert_checkpoints_equal,
    assert_states_equal,
    flat_state,
    read_config,
    read_dir,
    write_dir,
)
from numerics_testing import FP32_REL, assert_close, max_rel_diff
from safetensors import safe_open
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

import mimo_jax
from mimo_jax import hf
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE
from notebooks.synthetic_checkpoint import random_model

# One compiled function per model structure; the jit cache is shared by all tests.
_logits = jax.jit(lambda m, ids: m(ids, mtp=False).logits)
_outputs = jax.jit(lambda m, ids: m(ids))


# ---------------------------------------------------------------------------------------------
# Helpers.


def _layers(spec: str) -> tuple[list[str], list[str]]:
    """'FD SS SS' -> layer_types, mlp_layer_types (F/S attention, D/S mlp)."""
    pairs = spec.split()
    return (
        [FULL if p[0] == "F" else SLIDING for p in pairs],
        [DENSE if p[1] == "D" else SPARSE for p in pairs],
    )


# ---------------------------------------------------------------------------------------------
# 1. transformers -> ours: logits parity.

PARITY_CASES = {
    # kv 1 (SWA kv 2), tiny window, trivial groups, renormalised gates.
    "kv1_w5_groups1": dict(
        layers="FD SS SS FS",
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        v_head_dim=16,
        partial_rotary_factor=0.334,
        sliding_window=5,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        seq=19,
    ),
    # kv 2 (SWA kv 4), 4 groups keep 2, unnormalised scaled gates, SWA runs between globals and
    # two dense layers (one of them mid-stack).
    "kv2_w7_groups4of2_two_dense": dict(
        layers="FD SS SD SS FS SS",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        v_head_dim=12,
        partial_rotary_factor=0.5,
        sliding_window=7,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=False,
        seq=23,
    ),
    # 8 layers so the scanned stack (and unrolled layers around it) is exercised.
    "kv2_w12_groups2of1_scanned": dict(
        layers="FD SS FS SS FS SS FS SS",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        v_head_dim=16,
        partial_rotary_factor=0.334,
        sliding_window=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        seq=23,
        scanned=True,
    ),
}


def _torch_model(case: dict, seed: int) -> MiMoV2FlashForCausalLM:
    case = dict(case)
    layer_types, mlp_layer_types = _layers(case.pop("layers"))
    case.pop("seq"), case.pop("scanned", None)
    prf = case.pop("partial_rotary_factor")
    cfg = MiMoV2FlashConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        mlp_layer_types=mlp_layer_types,
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": prf},
            SLIDING: {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": prf},
        },
        attention_value_scale=0.707,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        # Larger than the default 0.02 so logits are O(1) and routing is not a near-tie lottery.
        initializer_range=0.1,
        attn_implementation="eager",
        **case,
    )
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_import_matches_transformers(name, tmp_path):
    case = PARITY_CASES[name]
    tm = _torch_model(case, seed=len(name))
    tm.save_pretrained(tmp_path)
    model = hf.load_hf(str(tmp_path))

    cfg = model.cfg
    assert (cfg.param_dtype, cfg.num_mtp_layers) == ("float32", 0)
    assert cfg.sliding_window == case["sliding_window"] < case["seq"]
    assert cfg.num_expert_groups == case["n_group"] and cfg.topk_groups == case["topk_group"]
    assert cfg.routed_scaling_factor == case["routed_scaling_factor"]
    assert cfg.norm_topk_prob == case["norm_topk_prob"]
    assert cfg.swa_num_kv_heads == 2 * case["num_key_value_heads"]
    assert (list(cfg.layer_types), list(cfg.mlp_layer_types)) == _layers(case["layers"])
    if case.get("scanned"):
        assert mimo_jax.layer_plan(cfg).repeats >= 2, mimo_jax.layer_plan(cfg)

    ids = np.random.default_rng(0).integers(0, 128, (2, case["seq"]))
    with torch.no_grad():
        want = tm(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    got = _logits(model, jnp.asarray(ids))
    assert_close(got, want, FP32_REL, f"{name} logits vs transformers")


# ---------------------------------------------------------------------------------------------
# 2. ours -> transformers.


def test_export_loads_in_transformers(tmp_path):
    cfg = mimo_jax.tiny(num_layers=7, num_mtp_layers=1, sliding_window=6, initializer_range=0.1)
    model = random_model(cfg, seed=1)
    hf.save_hf(model, tmp_path / "ckpt")

    tm, info = MiMoV2FlashForCausalLM.from_pretrained(
        tmp_path / "ckpt", attn_implementation="eager", output_loading_info=True
    )
    tm.eval()
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    # Only the MTP blocks (which transformers does not implement) may go unused.
    assert all(k.startswith("model.mtp.") for k in info["unexpected_keys"]), info
    assert tm.dtype == torch.float32
    assert tm.config.sliding_window == 6 and tm.config.layer_types == list(cfg.layer_types)

    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        want = tm(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    assert_close(
        _logits(model, jnp.asarray(ids)), want, FP32_REL, "exported logits in transformers"
    )

    # Re-saved by transformers: the MTP weights are gone but config.json still counts them.
    tm.save_pretrained(tmp_path / "resaved")
    with pytest.raises(ValueError, match="num_mtp_layers=0") as exc:
        hf.load_hf(str(tmp_path / "resaved"))
    assert "model.mtp.layers.0." in str(exc.value)
    back = flat_state(hf.load_hf(str(tmp_path / "resaved"), num_mtp_layers=0))
    ours = {p: x for p, x in flat_state(model).items() if p[0] != "mtp"}
    assert back.keys() == ours.keys()
    for path, x in ours.items():
        assert np.array_equal(back[path], x), f"{path} changed through transformers"


# ---------------------------------------------------------------------------------------------
# 3. Round trips, MTP included.

MTP_SUFFIXES = [
    "enorm.weight",
    "hnorm.weight",
    "eh_proj.weight",
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.attention_sink_bias",
    "pre_mlp_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "final_layernorm.weight",
]


@pytest.mark.parametrize(("num_mtp", "count_from"), [(2, "config"), (3, "tensors")])
def test_round_trip_bit_exact_with_mtp(num_mtp, count_from, tmp_path):
    cfg = mimo_jax.tiny(num_layers=7, num_mtp_layers=num_mtp, initializer_range=0.1)
    m1 = random_model(cfg, seed=num_mtp)
    d1, d2 = tmp_path / "a", tmp_path / "b"
    hf.save_hf(m1, d1)

    with open(d1 / hf.INDEX_FILE) as f:
        names = set(json.load(f)["weight_map"])
    for k in range(num_mtp):
        for suffix in MTP_SUFFIXES:
            assert f"model.mtp.layers.{k}.{suffix}" in names, f"model.mtp.layers.{k}.{suffix}"
    assert not any(n.startswith(f"model.mtp.layers.{num_mtp}.") for n in names)
    assert names == set(hf.hf_entries(m1))

    if count_from == "tensors":
        # The released checkpoint does not state its MTP depth: it must be counted.
        config = read_config(d1)
        del config["num_nextn_predict_layers"]
        with open(d1 / "config.json", "w") as f:
            json.dump(config, f)
    m2 = hf.load_hf(str(d1))
    assert m2.cfg.num_mtp_layers == num_mtp
    assert m2.cfg == m1.cfg
    assert_states_equal(m1, m2)

    hf.save_hf(m2, d2)
    if count_from == "tensors":
        # The export states the depth again; otherwise the two exports are identical.
        config = read_config(d2)
        assert config.pop("num_nextn_predict_layers") == num_mtp
        with open(d2 / "config.json", "w") as f:
            json.dump(config, f)
    assert_checkpoints_equal(d1, d2)

    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 11)))
    o1, o2 = _outputs(m1, ids), _outputs(m2, ids)
    assert len(o1.mtp_logits) == len(o2.mtp_logits) == num_mtp
    pairs = zip((o1.logits, *o1.mtp_logits), (o2.logits, *o2.mtp_logits), strict=True)
    for k, (a, b) in enumerate(pairs):
        assert_close(a, b, 0.0, f"round-tripped {'logits' if k == 0 else f'mtp_logits[{k - 1}]'}")


def test_mtp_tensors_land_under_hub_names(tmp_path):
    """Each exported MTP tensor is the parameter its hub name says (round trips cannot tell
    a consistent swap, e.g. enorm <-> hnorm, from the right mapping)."""
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=2)
    model = random_model(cfg, seed=11)
    hf.save_hf(model, tmp_path / "ckpt")
    tensors = {n: t.numpy() for n, t in read_dir(tmp_path / "ckpt").items()}
    d = cfg.embed_dim
    for k, layer in enumerate(model.mtp):
        pre = f"model.mtp.layers.{k}"

        def val(v):
            return np.asarray(v[...])

        expected = {
            "enorm.weight": val(layer.enorm.scale),
            "hnorm.weight": val(layer.hnorm.scale),
            "input_layernorm.weight": val(layer.input_layernorm.scale),
            "pre_mlp_layernorm.weight": val(layer.post_attention_layernorm.scale),
            "final_layernorm.weight": val(layer.final_layernorm.scale),
            # [D, 2D]: the first D input columns act on enorm(embedding), as in SGLang and vLLM.
            "eh_proj.weight": val(layer.eh_proj.kernel).T,
            "self_attn.attention_sink_bias": val(layer.self_attn.sinks),
            "self_attn.q_proj.weight": val(layer.self_attn.q_proj.kernel).reshape(d, -1).T,
            "self_attn.o_proj.weight": val(layer.self_attn.o_proj.kernel).reshape(-1, d).T,
            "mlp.gate_proj.weight": val(layer.mlp.gate_proj.kernel).T,
            "mlp.up_proj.weight": val(layer.mlp.up_proj.kernel).T,
            "mlp.down_proj.weight": val(layer.mlp.down_proj.kernel).T,
        }
        for suffix, want in expected.items():
            np.testing.assert_array_equal(tensors[f"{pre}.{suffix}"], want, err_msg=suffix)
        # SWA kv heads in the MTP attention.
        assert tensors[f"{pre}.self_attn.k_proj.weight"].shape == (2 * cfg.head_dim, d)


def test_bf16_export_keeps_fp32_router(tmp_path):
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1, param_dtype="bfloat16", dtype="bfloat16")
    model = random_model(cfg, seed=5)
    hf.save_hf(model, tmp_path / "ckpt")
    dtypes = {}
    with safe_open(tmp_path / "ckpt" / "model-00001-of-00001.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            dtypes[name] = f.get_slice(name).get_dtype()
    router = {n for n in dtypes if ".mlp.gate." in n}
    assert router and all(dtypes[n] == "F32" for n in router), {n: dtypes[n] for n in router}
    others = {n: d for n, d in dtypes.items() if n not in router and d != "BF16"}
    assert not others, others
    assert read_config(tmp_path / "ckpt")["torch_dtype"] == "bfloat16"
    back = hf.load_hf(str(tmp_path / "ckpt"))
    assert back.cfg == cfg
    assert_states_equal(model, back)


# ---------------------------------------------------------------------------------------------
# 4. Sharded export.


def test_sharded_export(tmp_path):
    cfg = mimo_jax.tiny(num_layers=4, num_mtp_layers=1)
    model = random_model(cfg, seed=4)
    table = hf.hf_entries(model)
    total = sum(4 * int(np.prod(e.hf_shape)) for e in table.values())  # fp32
    limit = total // 6
    hf.save_hf(model, tmp_path / "ckpt", max_shard_bytes=limit)

    d = tmp_path / "ckpt"
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(files) >= 6, files
    assert files == [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))
    ]
    with open(d / hf.INDEX_FILE) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    assert set(weight_map) == set(table), sorted(set(weight_map) ^ set(table))[:5]
    assert set(weight_map.values()) == set(files)
    assert index["metadata"]["total_size"] == total
    biggest = max(4 * int(np.prod(e.hf_shape)) for e in table.values())
    for fname in files:
        with safe_open(d / fname, "numpy") as f:
            held = set(f.keys())
            nbytes = sum(f.get_tensor(n).nbytes for n in held)
        assert held == {n for n, v in weight_map.items() if v == fname}, fname
        assert nbytes <= max(limit, biggest), (fname, nbytes, limit)

    assert_states_equal(model, hf.load_hf(str(d)))
    # transformers resolves the same index.
    tm, info = MiMoV2FlashForCausalLM.from_pretrained(
        d, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    np.testing.assert_array_equal(
        tm.lm_head.weight.detach().numpy(), np.asarray(model.lm_head.kernel[...]).T
    )


# ---------------------------------------------------------------------------------------------
# 5. FP8 block-quantized checkpoints.

_QUANTIZED = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$"
)


def _quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 style: one scale per 128x128 block, scale = amax / 448 (e4m3 max)."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(br * 128, bc * 128, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(br, 128, bc, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).view(br * 128, bc * 128)[:rows, :cols]
    return q.contiguous().to(torch.float8_e4m3fn), scale.contiguous()


def _dequantize_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return q.float() * s


def test_fp8_import_matches_dequantized_reference(tmp_path):
    # embed 160 and mlp 272 give 2-3 blocks per side with ragged last blocks.
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1, embed_dim=160, mlp_dim=272)
    model = random_model(cfg, seed=6)
    hf.save_hf(model, tmp_path / "fp32")
    tensors = read_dir(tmp_path / "fp32")
    config = read_config(tmp_path / "fp32")

    fp8, deq = {}, {}
    for name, w in tensors.items():
        if _QUANTIZED.search(name):
            q, s = _quantize_fp8(w)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = _dequantize_torch(q, s)
        else:
            fp8[name] = deq[name] = w
    quantized = [n for n in tensors if _QUANTIZED.search(n)]
    assert {
        "model.mtp.layers.0.eh_proj.weight",
        "model.layers.1.mlp.experts.7.down_proj.weight",
    } <= set(quantized)
    assert not any(".mlp.gate." in n or "lm_head" in n or "embed" in n for n in quantized)
    assert fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)
    write_dir(tmp_path / "fp8", fp8, config)
    write_dir(tmp_path / "deq", deq, config)

    got, want = (
        flat_state(hf.load_hf(str(tmp_path / "fp8"))),
        flat_state(hf.load_hf(str(tmp_path / "deq"))),
    )
    orig = flat_state(model)
    assert got.keys() == want.keys()
    for path in want:
        assert_close(got[path], want[path], 0.0, f"FP8 import vs torch dequantization {path}")
    # The FP8 path really ran: quantization error is present, and no larger than e4m3's
    # rounding allows: half a step of the top binade, 16 of the 448 a block's max maps to
    # (0.0357 of the max, plus fp32 rounding).
    kernel = ("layers", 0, "mlp", "gate_proj", "kernel")
    err = max_rel_diff(got[kernel], orig[kernel])
    print(f"FP8 quantization error {err:.4g} x max |w|")
    assert 0 < err <= 0.036, err
