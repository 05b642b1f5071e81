"""MoE: router semantics against a NumPy spec; ragged (fast path) against dense (reference);
the grouped matmul (blocked and ragged_dot) against a per-group NumPy product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import BF16_REL, FP32_REL, assert_close

import mimo_jax
from mimo_jax import moe as moe_lib
from mimo_jax.moe import MoE, grouped_matmul


def _cfg(**kw):
    base = dict(embed_dim=24, moe_mlp_dim=20, num_experts=8, num_experts_per_tok=3)
    return mimo_jax.tiny(**{**base, **kw})


def _router_spec(x, w, bias, cfg):
    """NumPy transcription of DeepSeek-V3 / transformers noaux_tc routing."""
    scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.astype(np.float64))))
    choice = scores + bias
    t, e = choice.shape
    g = cfg.num_expert_groups
    if g > 1:
        grouped = choice.reshape(t, g, e // g)
        gscore = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-gscore, axis=-1)[:, : cfg.topk_groups]
        mask = np.zeros((t, g), bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, e // g, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1)[:, : cfg.num_experts_per_tok]
    wts = np.take_along_axis(scores, idx, -1)
    if cfg.norm_topk_prob:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return wts * cfg.routed_scaling_factor, idx


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_expert_groups=4, topk_groups=2),
        dict(num_expert_groups=2, topk_groups=1, norm_topk_prob=False, routed_scaling_factor=2.5),
    ],
)
def test_router_matches_spec(kw):
    cfg = _cfg(**kw)
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    moe.router.bias.set_value(jax.random.normal(jax.random.key(2), (8,)) * 0.3)
    x = jax.random.normal(jax.random.key(3), (50, 24))
    wts, idx, _ = moe.router(x)
    ref_w, ref_idx = _router_spec(
        np.asarray(x), np.asarray(moe.router.kernel[...]), np.asarray(moe.router.bias[...]), cfg
    )
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(ref_idx, -1))
    order, ref_order = np.argsort(np.asarray(idx), -1), np.argsort(ref_idx, -1)
    got = np.take_along_axis(np.asarray(wts), order, -1)
    want = np.take_along_axis(ref_w, ref_order, -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_not_weights():
    cfg = _cfg()
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (40, 24))
    moe.router.bias.set_value(jnp.zeros(8).at[5].set(10.0))  # expert 5 always chosen
    wts, idx, scores = moe.router(x)
    assert np.all(np.any(np.asarray(idx) == 5, axis=-1))
    picked = np.take_along_axis(np.asarray(scores), np.asarray(idx), -1)
    np.testing.assert_allclose(np.asarray(wts), picked / picked.sum(-1, keepdims=True), rtol=1e-6)


def test_bfloat16_routes_as_float32():
    """With bf16 compute the router still runs in fp32: on the same bf16-representable input
    and weights, bf16 and fp32 MoEs choose the same experts and their outputs differ by bf16
    rounding. A bf16 router matmul or sigmoid rounds the scores (~0.5 here) to steps of
    2^-9..2^-8, so near-equal experts tie or swap and the routing differs."""
    cfg = _cfg(num_expert_groups=2, topk_groups=1)
    f32 = MoE(cfg, rngs=nnx.Rngs(4))
    f32.router.bias.set_value(jax.random.normal(jax.random.key(6), (8,)) * 0.01)
    state = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(v.dtype), nnx.state(f32))
    nnx.update(f32, state)
    b16 = MoE(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(b16, state)
    x = jax.random.normal(jax.random.key(5), (4, 32, 24)).astype(jnp.bfloat16)  # [B, T, D]
    (ya, aux_a), (yb, aux_b) = f32(x.astype(jnp.float32)), b16(x)
    np.testing.assert_array_equal(aux_b["routing"], aux_a["routing"])
    assert yb.dtype == jnp.bfloat16
    # Each expert rounds to bf16 after both input matmuls, the SwiGLU product and the output
    # matmul, whose sums cancel: the outputs land up to ~1e-2 of the largest one.
    assert_close(yb, ya, 2 * BF16_REL, "bf16 vs fp32 MoE output")


def _loss(moe, x):
    y, aux = moe(x)
    return jnp.sum(jnp.sin(y)) + aux["seq_aux_loss"]


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("skew", [False, True])
def test_ragged_equals_dense_forward_and_grad(skew, impl, monkeypatch):
    # Both grouped-matmul lowerings run on CPU; "auto" would pick only the blocked one here.
    monkeypatch.setattr(moe_lib, "grouped_matmul_impl", lambda implementation="auto": impl)
    cfg = _cfg(num_expert_groups=2, topk_groups=2)
    dense = MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(4))
    if skew:  # overload one expert: every token routes to expert 0
        dense.router.bias.set_value(jnp.zeros(8).at[0].set(5.0))
    ragged = MoE(cfg.replace(moe_impl="ragged"), rngs=nnx.Rngs(0))
    nnx.update(ragged, nnx.state(dense))
    x = jax.random.normal(jax.random.key(5), (3, 17, 24))
    (ld, gd), (lr, gr) = (nnx.value_and_grad(_loss, argnums=(0, 1))(m, x) for m in (dense, ragged))
    assert_close(lr, ld, FP32_REL, "ragged vs dense loss")
    for (path, a), b in zip(jax.tree.leaves_with_path(gd), jax.tree.leaves(gr), strict=True):
        assert_close(b, a, FP32_REL, f"ragged vs dense grad {jax.tree_util.keystr(path)}")
    _, aux = ragged(x)
    if skew:
        assert aux["expert_load"][0] == 3 * 17
    assert float(aux["expert_load"].sum()) == 3 * 17 * cfg.num_experts_per_tok


@pytest.mark.parametrize(
    "shape, path", [((1, 1), "sliced"), ((1, 2), "dense"), ((2, 4), "dense"), ((1, 9), "blocked")]
)
def test_cpu_decoding_paths_equal_dense_forward_and_grad(shape, path, monkeypatch):
    """Few tokens take the sliced or the in-place dense path on CPU; each equals the dense MoE."""
    monkeypatch.setattr(moe_lib, "grouped_matmul_impl", lambda implementation="auto": "blocked")
    paths = {"sliced": "_sliced_experts", "dense": "_dense_experts", "blocked": "_blocked_experts"}
    for other, fn in paths.items():
        if other != path:
            msg = f"{shape} took the {other} path, not {path}"
            monkeypatch.setattr(moe_lib, fn, lambda *a, msg=msg: pytest.fail(msg))
    cfg = _cfg(num_expert_groups=2, topk_groups=2)  # k = 3, E = 8
    assert moe_lib.cpu_expert_path(shape[0] * shape[1], 3, 8) == path
    dense = MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(4))
    fast = MoE(cfg.replace(moe_impl="ragged"), rngs=nnx.Rngs(0))
    nnx.update(fast, nnx.state(dense))
    x = jax.random.normal(jax.random.key(5), (*shape, 24))
    (ld, gd), (lf, gf) = (nnx.value_and_grad(_loss, argnums=(0, 1))(m, x) for m in (dense, fast))
    assert_close(lf, ld, FP32_REL, f"{path} vs dense loss")
    for (p, a), b in zip(jax.tree.leaves_with_path(gd), jax.tree.leaves(gf), strict=True):
        assert_close(b, a, FP32_REL, f"{path} vs dense grad {jax.tree_util.keystr(p)}")


def test_routing_replay():
    cfg = _cfg()
    moe = MoE(cfg, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(5), (2, 9, 24))
    y, aux = moe(x)
    y_replayed, _ = moe(x, aux["routing"])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_replayed))
    forced = jnp.broadcast_to(jnp.array([1, 2, 3]), (2, 9, 3))
    _, aux2 = moe(x, forced)
    np.testing.assert_array_equal(np.asarray(aux2["routing"]), np.asarray(forced))


# Group sizes over 8 experts for R = 45 rows: skewed (one expert takes almost every row, most
# are empty), all rows on the last expert, uniform-ish, a partial sum (the tail rows belong to no
# group and must come out as zeros), and no rows at all.
_GROUPS = [
    [0, 41, 0, 0, 1, 0, 3, 0],
    [0, 0, 0, 0, 0, 0, 0, 45],
    [6, 5, 7, 4, 6, 5, 6, 6],
    [3, 0, 9, 0, 0, 17, 0, 2],
    [0, 0, 0, 0, 0, 0, 0, 0],
]


def _grouped_spec(x, w, sizes):
    """fp64 NumPy: rows of group e times w[e], zeros past the groups."""
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, g in enumerate(sizes):
        y[start : start + g] = x[start : start + g].astype(np.float64) @ w[e].astype(np.float64)
        start += g
    return y


@pytest.mark.parametrize("block_size", [None, 4, 16])
@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("sizes", _GROUPS)
def test_grouped_matmul_matches_spec(sizes, impl, block_size):
    x = jax.random.normal(jax.random.key(0), (45, 13))  # [R, D]
    w = jax.random.normal(jax.random.key(1), (8, 13, 7))  # [E, D, M]
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jax.random.normal(jax.random.key(2), (45, 7))  # cotangent [R, M]

    def loss(x, w):
        y = grouped_matmul(x, w, gs, implementation=impl, block_size=block_size)
        return jnp.sum(y * ct), y

    (_, y), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    xn, wn, ctn = (np.asarray(a, np.float64) for a in (x, w, ct))
    assert_close(y, _grouped_spec(xn, wn, sizes), FP32_REL, "grouped_matmul")
    # d/dx of sum(y * ct): row r of group e gets ct[r] @ w[e].T; rows past the groups get 0.
    # d/dw[e]: x[group e].T @ ct[group e]; 0 for empty experts.
    gx_ref, gw_ref, start = np.zeros_like(xn), np.zeros_like(wn), 0
    for e, g in enumerate(sizes):
        gx_ref[start : start + g] = ctn[start : start + g] @ wn[e].T
        gw_ref[e] = xn[start : start + g].T @ ctn[start : start + g]
        start += g
    assert_close(gx, gx_ref, FP32_REL, "grouped_matmul d/dx")
    assert_close(gw, gw_ref, FP32_REL, "grouped_matmul d/dw")


def test_block_layout_bound_holds_for_worst_routing():
    # Every non-empty group one row past a block boundary maximises the padding: the static
    # ceil(R / b) + E - 1 blocks must still hold every row exactly once.
    b, e = 4, 8
    sizes = np.array([b + 1] * 7 + [0])
    r = int(sizes.sum())
    block_expert, slot_row, row_slot = moe_lib._block_layout(jnp.asarray(sizes), r, b)
    assert block_expert.shape == (-(-r // b) + e - 1,)
    slot_row, row_slot = np.asarray(slot_row), np.asarray(row_slot)
    np.testing.assert_array_equal(slot_row[row_slot], np.arange(r))  # slots and rows invert
    assert np.sum(slot_row < r) == r
    owner = np.asarray(block_expert)[row_slot // b]
    np.testing.assert_array_equal(owner, np.repeat(np.arange(e), sizes))


def test_grouped_matmul_auto_is_blocked_on_cpu():
    assert moe_lib.grouped_matmul_impl() == (
        "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    )
    with pytest.raises(ValueError, match="implementation"):
        moe_lib.grouped_matmul_impl("megablocks")
