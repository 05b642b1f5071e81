"""MoE: router semantics against a NumPy spec; ragged (fast path) against dense (reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.moe import MoE


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


def _loss(moe, x):
    y, aux = moe(x)
    return jnp.sum(jnp.sin(y)) + aux["seq_aux_loss"]


@pytest.mark.parametrize("skew", [False, True])
def test_ragged_equals_dense_forward_and_grad(skew):
    cfg = _cfg(num_expert_groups=2, topk_groups=2)
    dense = MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(4))
    if skew:  # overload one expert: every token routes to expert 0
        dense.router.bias.set_value(jnp.zeros(8).at[0].set(5.0))
    ragged = MoE(cfg.replace(moe_impl="ragged"), rngs=nnx.Rngs(0))
    nnx.update(ragged, nnx.state(dense))
    x = jax.random.normal(jax.random.key(5), (3, 17, 24))
    (ld, gd), (lr, gr) = (nnx.value_and_grad(_loss, argnums=(0, 1))(m, x) for m in (dense, ragged))
    assert np.isfinite(ld) and np.isfinite(lr)
    np.testing.assert_allclose(lr, ld, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(gr), strict=True):
        assert np.all(np.isfinite(b))
        diff = np.max(np.abs(np.asarray(a) - np.asarray(b)))
        assert diff < 1e-5, f"grad max diff {diff}"
    _, aux = ragged(x)
    if skew:
        assert aux["expert_load"][0] == 3 * 17
    assert float(aux["expert_load"].sum()) == 3 * 17 * cfg.num_experts_per_tok


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
