"""Rollout Routing Replay (R3): a bf16 rollout's experts replayed in the fp32 training forward
(dense, ragged and expert-parallel MoE), the router's gradient under replay, the -1 rule,
``router_choice``, and the R3 metrics against NumPy transcriptions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close

import mimo_jax
from mimo_jax import hf
from mimo_jax import sharding as sh
from mimo_jax.data import ByteTokenizer
from mimo_jax.moe import MoE
from mimo_jax.post_training import r3, rollout

# Dense layer 0, then 3 MoE layers (one scanned period of 1, repeated 3 times). Init 0.2 spreads
# the router logits enough that routing is not trivial, and leaves near-ties that bf16 rounding
# flips: the fp32 router disagrees with the bf16 rollout on a few percent of decisions.
CFG = mimo_jax.tiny(num_layers=4, initializer_range=0.2, num_mtp_layers=1, moe_impl="ragged")
PROMPTS = ["12+34=", "7*8=", "reverse abc:", "x"] * 2
PROMPT_LEN = 12


def _forward_aux(model, tokens, routing=None):
    return jax.jit(lambda m, t, r: m(t, routing=r, mtp=False).aux)(model, tokens, routing)


@pytest.fixture(scope="module")
def setup():
    """The fp32 policy, its bf16 rollouts (ragged prompts, so padding) and their valid mask."""
    model = mimo_jax.MiMoV2Flash(CFG, rngs=nnx.Rngs(0))
    ro = rollout.sample(
        rollout.rollout_model(model, "bfloat16"), ByteTokenizer(), PROMPTS,
        prompt_len=PROMPT_LEN, max_new_tokens=10, temperature=1.0, seed=0,
    )  # fmt: skip
    lengths = np.array([len(p) for p in PROMPTS])
    pos = np.arange(ro.tokens.shape[1])[None]
    valid = (pos < lengths[:, None]) | (ro.response_mask > 0)  # [B, S] prompt or response
    assert not valid.all()  # padding inside prompts and after responses
    moe = r3.moe_layer_mask(CFG)
    np.testing.assert_array_equal(moe, [False, True, True, True])
    # Recorded on MoE layers at every valid position but each row's final token (sampled, not
    # fed back); -1 elsewhere.
    ends = valid.sum(axis=1)
    consumed = valid & (pos < ends[:, None] - 1)  # valid is a prefix of each row
    want = np.broadcast_to(moe[:, None, None, None] & consumed[..., None], ro.routing.shape)
    np.testing.assert_array_equal(ro.routing >= 0, want)
    return model, ro, consumed, moe


def _with_impl(model, impl):
    """The same parameters under another ``moe_impl``."""
    cfg = dataclasses.replace(model.cfg, moe_impl=impl)
    other = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(model))
    return other


def test_fp32_router_disagrees_with_bf16_rollout_without_replay(setup):
    model, ro, valid, moe = setup
    aux = _forward_aux(model, jnp.asarray(ro.tokens))
    np.testing.assert_array_equal(aux["router_choice"], aux["routing"])
    d = r3.routing_disagreement(aux["routing"], ro.routing, valid, moe)
    assert 0 < float(d) < 0.5, float(d)


@pytest.mark.parametrize("impl", ["dense", "ragged", "expert_parallel"])
def test_bf16_rollout_replayed_in_fp32_uses_the_rollout_experts(setup, impl):
    model, ro, valid, moe = setup
    tokens, routing = jnp.asarray(ro.tokens), jnp.asarray(ro.routing)
    m = _with_impl(model, impl)
    if impl == "expert_parallel":
        with sh.use_mesh(sh.make_mesh((1, 1, 8, 1)), "fsdp_ep"):
            aux = _forward_aux(m, tokens, routing)
    else:
        aux = _forward_aux(m, tokens, routing)
    used, own = np.asarray(aux["routing"]), np.asarray(aux["router_choice"])
    recorded = ro.routing >= 0  # [L, B, S, k]
    np.testing.assert_array_equal(used[recorded], ro.routing[recorded])
    # -1 rule: padding tokens of MoE layers route with the router's own choice.
    pad = moe[:, None, None] & ~valid[None]  # [L, B, S]
    np.testing.assert_array_equal(used[pad], own[pad])
    assert used[moe].min() >= 0
    np.testing.assert_array_equal(used[~moe], -1)
    np.testing.assert_array_equal(own[~moe], -1)
    # The training router's own choice still disagrees: replay is what makes them match.
    assert float(r3.routing_disagreement(used, ro.routing, valid, moe)) == 0.0
    assert float(r3.routing_disagreement(own, ro.routing, valid, moe)) > 0.0
    # expert_load counts only real experts: T assignments * k per MoE layer, none on dense ones.
    load = np.asarray(aux["expert_load"])
    np.testing.assert_array_equal(load.sum(-1), moe * tokens.size * CFG.num_experts_per_tok)


def test_scanned_and_unrolled_replay_alike(setup, tmp_path):
    model, ro, _, _ = setup
    assert len(model.scanned) == 1 and len(model.layers) == 1  # layer 0 unrolled, 3 scanned
    hf.save_hf(model, str(tmp_path / "m"))
    unrolled = hf.load_hf(str(tmp_path / "m"), scan_layers=False)
    assert len(unrolled.scanned) == 0
    tokens, routing = jnp.asarray(ro.tokens), jnp.asarray(ro.routing)
    for r in (None, routing):
        a, b = _forward_aux(model, tokens, r), _forward_aux(unrolled, tokens, r)
        for key in ("routing", "router_choice"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}, replay={r is not None}")


def test_replay_keeps_the_router_gradient(setup):
    """Replaying the router's own choice is the un-replayed forward, gradient included."""
    model, ro, _, _ = setup
    ids = jnp.asarray(ro.tokens)
    own = _forward_aux(model, ids)["routing"]

    def loss(m, routing):
        out = m(ids, routing=routing, mtp=False)
        return jnp.mean(jnp.sin(out.logits))

    grad = jax.jit(nnx.grad(loss))
    g_plain, g_replay = grad(model, None), grad(model, own)
    k_plain = g_plain["scanned"][0]["mlp"]["router"]["kernel"][...]  # [R, D, E]
    k_replay = g_replay["scanned"][0]["mlp"]["router"]["kernel"][...]
    assert np.all(np.abs(np.asarray(k_replay)).reshape(3, -1).max(-1) > 0)  # every MoE layer
    assert_close(k_replay, k_plain, FP32_REL, "router kernel gradient, replayed vs not")
    for a, b in zip(jax.tree.leaves(g_replay), jax.tree.leaves(g_plain), strict=True):
        assert_close(a, b, FP32_REL, "parameter gradient, replayed vs not")


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_unrecorded_tokens_use_the_router_choice(impl):
    """A token with any id < 0 routes exactly as without replay; other tokens use the replay."""
    cfg = dataclasses.replace(CFG, moe_impl=impl)
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    b, t, k, e = 2, 11, cfg.num_experts_per_tok, cfg.num_experts
    x = jax.random.normal(jax.random.key(3), (b, t, cfg.embed_dim))
    rng = np.random.default_rng(0)
    forced = np.stack([rng.permutation(e)[:k] for _ in range(b * t)]).reshape(
        b, t, k
    )  # distinct ids per token
    unrecorded = rng.random((b, t)) < 0.4
    unrecorded[0, 0] = unrecorded[1, -1] = True
    unrecorded[0, 1] = False
    replay = forced.copy()
    replay[unrecorded] = -1
    replay[0, 2, 0], unrecorded[0, 2] = -1, True  # one id of k missing: the whole token falls back
    run = jax.jit(lambda mod, r: mod(x, r))
    y0, aux0 = run(moe, None)
    y1, aux1 = run(moe, jnp.asarray(replay))
    used, own = np.asarray(aux1["routing"]), np.asarray(aux0["routing"])
    np.testing.assert_array_equal(used[unrecorded], own[unrecorded])
    np.testing.assert_array_equal(used[~unrecorded], forced[~unrecorded])
    np.testing.assert_array_equal(aux1["router_choice"], own)
    assert_close(np.asarray(y1)[unrecorded], np.asarray(y0)[unrecorded], FP32_REL, "y at -1")
    want_load = np.bincount(used.reshape(-1), minlength=e)
    np.testing.assert_array_equal(aux1["expert_load"], want_load)


# ---------------------------------------------------------------------------------------------
# Metrics against NumPy transcriptions.


def _np_disagreement(own, rollout_ids, mask, moe_layers):
    num = den = 0.0
    for l in range(own.shape[0]):  # noqa: E741
        if not moe_layers[l]:
            continue
        for bi in range(own.shape[1]):
            for ti in range(own.shape[2]):
                num += mask[bi, ti] * (set(own[l, bi, ti]) != set(rollout_ids[l, bi, ti]))
                den += mask[bi, ti]
    return num / max(den, 1.0)


def test_routing_disagreement_matches_numpy():
    rng = np.random.default_rng(0)
    l, b, t, k, e = 4, 3, 9, 2, 6
    own = np.stack([rng.permutation(e)[:k] for _ in range(l * b * t)]).reshape(l, b, t, k)
    other = own.copy()
    perm = rng.random((l, b, t)) < 0.3  # same set, other order: not a disagreement
    other[perm] = other[perm][:, ::-1]
    new = rng.random((l, b, t)) < 0.3
    other[new] = np.stack([rng.permutation(e)[:k] for _ in range(int(new.sum()))])
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    moe_layers = np.array([False, True, True, True])
    got = r3.routing_disagreement(jnp.asarray(own), jnp.asarray(other), mask, moe_layers)
    want = _np_disagreement(own, other, mask, moe_layers)
    assert 0 < want < 1
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    only_order = np.where(perm[..., None], own[..., ::-1], own)
    assert float(r3.routing_disagreement(own, only_order, mask, moe_layers)) == 0.0
    assert float(r3.routing_disagreement(own, other, np.zeros((b, t)), moe_layers)) == 0.0


def test_kl_and_extreme_share_match_numpy():
    rng = np.random.default_rng(1)
    b, t = 4, 13
    rollout_logp = np.log(rng.uniform(0.01, 1.0, (b, t)))
    train_logp = rollout_logp + rng.normal(0, 0.6, (b, t))  # some ratios outside [1/2, 2]
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    r = np.exp(train_logp - rollout_logp)
    want_kl = np.sum(mask * (r - 1 - np.log(r))) / mask.sum()
    outside = (r < 0.5) | (r > 2.0)
    want_share = np.sum(mask * outside) / mask.sum()
    assert 0 < want_share < 1
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    kl = jax.jit(r3.train_inference_kl)(f32(train_logp), f32(rollout_logp), f32(mask))
    np.testing.assert_allclose(float(kl), want_kl, rtol=1e-5)
    share = jax.jit(r3.extreme_ratio_share)(f32(train_logp), f32(rollout_logp), f32(mask))
    np.testing.assert_allclose(float(share), want_share, rtol=1e-6)
    tight = np.sum(mask * ((r < 0.9) | (r > 1.2))) / mask.sum()
    got = r3.extreme_ratio_share(f32(train_logp), f32(rollout_logp), f32(mask), 0.9, 1.2)
    np.testing.assert_allclose(float(got), tight, rtol=1e-6)
    zero = np.zeros((b, t), np.float32)
    assert float(r3.train_inference_kl(f32(train_logp), f32(rollout_logp), zero)) == 0.0
    assert float(r3.train_inference_kl(f32(train_logp), f32(train_logp), f32(mask))) == 0.0
    with pytest.raises(ValueError, match="0 < low <= high"):
        r3.extreme_ratio_share(f32(train_logp), f32(rollout_logp), f32(mask), 2.0, 0.5)
