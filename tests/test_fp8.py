"""FP8 block scales (mimo_jax/fp8.py): plain 128x128 blocks, and the release's fused per-KV-head
K|V layout of the full-attention k_proj / v_proj (docs/hf_conversion.md), read by hand, at the
release's real dims, and through ``load_hf`` on a tiny hub-format checkpoint. CPU, numpy."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hf_testing import assert_states_equal, read_config, read_dir, write_dir

import mimo_jax
from mimo_jax import fp8, hf
from notebooks.synthetic_checkpoint import random_model

E4M3_MAX = 448.0
# e4m3 keeps 3 mantissa bits: in the top binade [256, 448] the step is 32, so rounding moves a
# value by at most 16 / 448 = 0.0357 of its block's max |w| (plus fp32 rounding).
FP8_REL = 0.036


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek-V3 style: one scale per 128x128 block, scale = block max |w| / 448.

    Args:
      w: [R, C] float32.

    Returns:
      q [R, C] float8_e4m3fn; scale [ceil(R / 128), ceil(C / 128)] float32; this test's own
      dequantization q * scale [R, C] float32; and amax [R, C], the max |w| of each element's block
      (what the rounding error is relative to).
    """
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = np.zeros((br * 128, bc * 128), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(br, 128, bc, 128)
    amax = np.abs(blocks).max(axis=(1, 3))  # [br, bc]
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(br * 128, bc * 128)[:rows, :cols]
    q = q.astype(ml_dtypes.float8_e4m3fn)
    expand = lambda x: np.repeat(np.repeat(x, 128, 0), 128, 1)[:rows, :cols]  # noqa: E731
    return q, scale, q.astype(np.float32) * expand(scale), expand(amax)


def quantize_fused_kv(k_w: np.ndarray, v_w: np.ndarray, num_heads: int):
    """The release's layout: each KV head's K rows stacked over its V rows, quantized as one matrix.

    Blocks that start among a head's K rows become rows of k_proj's scale, the others rows of
    v_proj's (written here per head, independently of mimo_jax.fp8's row index).

    Args:
      k_w: [K * H, C] float32.
      v_w: [K * P, C] float32.
      num_heads: K.

    Returns:
      ((k_q, k_scale, k_deq, k_amax), (v_q, v_scale, v_deq, v_amax)) as quantize_blocks returns
      them, the dequantization reading each head's fused blocks.
    """
    h, p = k_w.shape[0] // num_heads, v_w.shape[0] // num_heads
    k_blocks = -(-h // 128)
    k_parts, v_parts = [], []
    for i in range(num_heads):
        fused = np.concatenate([k_w[i * h : (i + 1) * h], v_w[i * p : (i + 1) * p]])  # [H + P, C]
        q, s, deq, amax = quantize_blocks(fused)
        k_parts.append((q[:h], s[:k_blocks], deq[:h], amax[:h]))
        v_parts.append((q[h:], s[k_blocks:], deq[h:], amax[h:]))
    return tuple(
        tuple(np.concatenate(x) for x in zip(*parts, strict=True)) for parts in (k_parts, v_parts)
    )


def block_error(got: np.ndarray, want: np.ndarray, amax: np.ndarray) -> float:
    """max |got - want| / (max |w| of the element's block), in float64."""
    return float((np.abs(got.astype(np.float64) - want) / amax).max())


# ---------------------------------------------------------------------------------------------
# 1. The layout by hand.


def test_dequantize_fp8_by_hand():
    w = np.arange(1, 10, dtype=np.float32).reshape(3, 3).astype(ml_dtypes.float8_e4m3fn)
    s = np.array([[1.0, 10.0], [100.0, 1000.0]], np.float32)
    want = np.array([[1, 2, 30], [4, 5, 60], [700, 800, 9000]], np.float32)
    got = fp8.dequantize_fp8(w, s, block=2)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)

    # Default 128 blocks with a ragged edge: each corner takes its own block's scale.
    w = np.full((130, 257), 1.5, ml_dtypes.float8_e4m3fn)
    s = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    got = fp8.dequantize_fp8(w, s)
    for r, c, k in [(0, 0, 1), (127, 127, 1), (128, 0, 4), (0, 128, 2), (129, 256, 6), (5, 256, 3)]:
        assert got[r, c] == 1.5 * k, (r, c, got[r, c])
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize_fp8(w, s[:1])


def test_quantize_fp8_matches_this_test_and_round_trips():
    # The library's quantizer (bench and notebook checkpoints use it) against this test's own,
    # on a shape with ragged blocks, an all-zero block and blocks of very different magnitude.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 200)).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -6, 6, size=(300, 1)
    )
    w[:128, :128] = 0.0
    q, scale = fp8.quantize_fp8(w)
    want_q, want_scale, deq, amax = quantize_blocks(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(q.view(np.uint8), want_q.view(np.uint8))
    np.testing.assert_array_equal(fp8.dequantize_fp8(q, scale), deq)
    assert not deq[:128, :128].any()  # the all-zero block stays zero
    live = amax > 0
    # e4m3 rounds to within 16 / 448 of the block max
    assert block_error(deq[live], w[live], amax[live]) <= 0.036


def test_fused_rows_of_the_release():
    """Per KV head h (of 4): K rows [192h, 192h+128) -> k_scale[2h]; K rows [192h+128, 192h+192)
    and V rows [128h, 128h+64) -> k_scale[2h+1]; V rows [128h+64, 128h+128) -> v_scale[h]."""
    kv = fp8.FusedKV("k", "v", num_heads=4, k_dim=192, v_dim=128)
    assert kv.plain_scale_rows() == (6, 4)
    assert kv.fused_scale_rows() == (8, 4)
    k_rows, v_rows = kv.fused_rows("k"), kv.fused_rows("v")  # into concat([k_scale, v_scale])
    assert k_rows.shape == (768,) and v_rows.shape == (512,)
    for h in range(4):
        assert (k_rows[192 * h : 192 * h + 128] == 2 * h).all()
        assert (k_rows[192 * h + 128 : 192 * h + 192] == 2 * h + 1).all()
        assert (v_rows[128 * h : 128 * h + 64] == 2 * h + 1).all()
        assert (v_rows[128 * h + 64 : 128 * h + 128] == 8 + h).all()
    # The release's sliding-window k/v (8 KV heads) are plain blocks: [12, 32] and [8, 32].
    assert fp8.FusedKV("k", "v", 8, 192, 128).plain_scale_rows() == (12, 8)
    # Shapes cannot tell the layouts apart with one KV head, nor with block-aligned heads.
    assert fp8.FusedKV("k", "v", 1, 192, 128).fused_scale_rows() is None
    assert fp8.FusedKV("k", "v", 4, 128, 128).fused_scale_rows() is None
    # All V rows inside K's last block: V would own no scale row.
    assert fp8.FusedKV("k", "v", 4, 24, 16).fused_scale_rows() is None


def test_release_kv_layer_dequantizes_within_fp8_rounding():
    """One full-attention layer at the release's dims: k_proj [768, 4096] with scale [8, 32],
    v_proj [512, 4096] with scale [4, 32]."""
    heads, h, p, d = 4, 192, 128, 4096
    rng = np.random.default_rng(0)
    # Real K and V rows differ in magnitude between heads and between K and V; so does this
    # source (one magnitude per 64 fused rows), so a block read with another block's scale shows.
    mag = 2.0 ** rng.uniform(-3, 3, size=(heads, (h + p) // 64, 1, 1))
    fused = (rng.standard_normal((heads, (h + p) // 64, 64, d)) * mag).reshape(heads, h + p, d)
    fused = fused.astype(ml_dtypes.bfloat16).astype(np.float32)  # a bf16 source
    k_w, v_w = fused[:, :h].reshape(heads * h, d), fused[:, h:].reshape(heads * p, d)
    (k_q, k_s, _, k_amax), (v_q, v_s, _, v_amax) = quantize_fused_kv(k_w, v_w, heads)
    assert k_s.shape == (8, 32) and v_s.shape == (4, 32)

    kv = fp8.FusedKV("k", "v", heads, h, p)
    scales = np.concatenate([k_s, v_s])
    k_err = block_error(fp8.dequantize_rows(k_q, scales, kv.fused_rows("k")), k_w, k_amax)
    v_err = block_error(fp8.dequantize_rows(v_q, scales, kv.fused_rows("v")), v_w, v_amax)
    # The plain-block reading (k's scale cropped to ceil(768 / 128) = 6 rows, v's as is).
    k_plain = block_error(fp8.dequantize_fp8(k_q, k_s[:6]), k_w, k_amax)
    v_plain = block_error(fp8.dequantize_fp8(v_q, v_s), v_w, v_amax)
    print(
        f"error / block max: fused k {k_err:.4g} v {v_err:.4g}; "
        f"plain k {k_plain:.4g} v {v_plain:.4g}"
    )
    assert 0 < k_err <= FP8_REL and 0 < v_err <= FP8_REL, (k_err, v_err)
    assert k_plain > 10 * FP8_REL and v_plain > 10 * FP8_REL, (k_plain, v_plain)


# ---------------------------------------------------------------------------------------------
# 2. Through load_hf: a tiny hub-format checkpoint whose full-attention k/v use the fused layout.

FULL_K, FULL_V = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"


def _torch_fp8(q: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def hub_fp8(tmp_path_factory):
    """(fp8 tensors, dequantized tensors, config): the released FP8 layout on a tiny model.

    Layer 0 is full attention with 2 KV heads of head_dim 192 / v_head_dim 128: its k/v are fused
    (k scale [4, 2], where plain blocks give [3, 2]); the sliding-window layer and the MTP block
    (4 KV heads) use plain blocks (k scale [6, 2]), as in the release. No o_proj is quantized
    and none has a scale, while ``ignored_layers`` names only the main layers' o_proj, as in the
    release.
    """
    cfg = mimo_jax.tiny(
        num_layers=2,
        num_mtp_layers=1,
        embed_dim=160,
        num_heads=4,
        num_kv_heads=2,
        swa_num_kv_heads=4,
        head_dim=192,
        v_head_dim=128,
        param_dtype="bfloat16",
    )
    src = tmp_path_factory.mktemp("fp8") / "bf16"
    hf.save_hf(random_model(cfg, seed=11), src)
    tensors, config = read_dir(src), read_config(src)
    assert config["torch_dtype"] == "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(2)],
    }
    source = {n: t.float().numpy() for n, t in tensors.items()}
    quantized, deq = dict(tensors), dict(tensors)
    for name in [n for n in source if fp8.RELEASE_FP8.search(n) and n not in (FULL_K, FULL_V)]:
        q, s, w, amax = quantize_blocks(source[name])
        assert block_error(w, source[name], amax) <= FP8_REL, name
        quantized[name], quantized[fp8.scale_name(name)] = _torch_fp8(q), torch.from_numpy(s)
        deq[name] = torch.from_numpy(w)
    fused = quantize_fused_kv(source[FULL_K], source[FULL_V], num_heads=2)
    for name, (q, s, w, amax) in zip((FULL_K, FULL_V), fused, strict=True):
        assert block_error(w, source[name], amax) <= FP8_REL, name
        quantized[name], quantized[fp8.scale_name(name)] = _torch_fp8(q), torch.from_numpy(s)
        deq[name] = torch.from_numpy(w)
    assert quantized[fp8.scale_name(FULL_K)].shape == (4, 2)
    assert quantized[fp8.scale_name(FULL_V)].shape == (2, 2)
    assert quantized["model.layers.1.self_attn.k_proj.weight_scale_inv"].shape == (6, 2)
    assert quantized["model.mtp.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    return quantized, deq, config


def test_load_hf_reads_fused_kv(hub_fp8, tmp_path):
    """The FP8 checkpoint loads exactly as its test-side dequantization does, which is within
    FP8 rounding of the bf16 source (checked in the fixture); the unquantized o_proj load as is."""
    quantized, deq, config = hub_fp8
    write_dir(tmp_path / "fp8", quantized, config)
    write_dir(tmp_path / "deq", deq, config)
    got = hf.load_hf(str(tmp_path / "fp8"), param_dtype="float32")
    assert_states_equal(got, hf.load_hf(str(tmp_path / "deq"), param_dtype="float32"))


# ---------------------------------------------------------------------------------------------
# 3. Scales that fit neither layout are refused, naming the tensor, the shape and what fits.

K_SCALE, V_SCALE = fp8.scale_name(FULL_K), fp8.scale_name(FULL_V)
Q_SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"

SCALE_CORRUPTIONS = {
    "k_rows": (
        lambda t: t.update({K_SCALE: torch.ones(5, 2)}),
        K_SCALE,
        ["(5, 2)", "(3, 2)", "(4, 2)"],
    ),
    "v_rows": (lambda t: t.update({V_SCALE: torch.ones(3, 2)}), V_SCALE, ["(3, 2)", "(2, 2)"]),
    # A fused k scale needs v's: with v_proj unquantized, k's [4, 2] fits nothing.
    "fused_k_without_v": (
        lambda t: t.update({FULL_V: t[FULL_V].float().bfloat16()}) or t.pop(V_SCALE),
        K_SCALE,
        ["(4, 2)", "(3, 2)"],
    ),
    # Only k/v may be fused: a q_proj scale of the fused shape is refused.
    "q_rows": (lambda t: t.update({Q_SCALE: torch.ones(8, 2)}), Q_SCALE, ["(8, 2)", "(6, 2)"]),
}


@pytest.mark.parametrize("kind", list(SCALE_CORRUPTIONS))
def test_bad_scale_shape_is_named(kind, hub_fp8, tmp_path):
    corrupt, culprit, shapes = SCALE_CORRUPTIONS[kind]
    tensors, _, config = hub_fp8
    tensors = dict(tensors)
    corrupt(tensors)
    write_dir(tmp_path / "bad", tensors, config)
    with pytest.raises(ValueError) as exc:
        hf.load_hf(str(tmp_path / "bad"))
    msg = str(exc.value)
    assert culprit in msg and all(s in msg for s in shapes), msg
