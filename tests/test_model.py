"""Model structure: scanned vs unrolled stacks, MTP semantics, causality, axis metadata; bf16
compute against fp32; the Pallas attention inside the model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import BF16_REL, FP32_REL, assert_close

import mimo_jax
from mimo_jax import hf
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE
from mimo_jax.layers import RMSNorm
from notebooks.synthetic_checkpoint import random_model


@pytest.fixture(scope="module")
def scanned_and_unrolled(tmp_path_factory):
    # Dense global layer 0, then the period (SWA, global, SWA) of MoE layers twice: both layer
    # types inside the scanned period, in 7 layers (the 13-layer tiny() compiles twice as long).
    types = (FULL, SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING)
    cfg = mimo_jax.tiny(
        num_layers=7, layer_types=types, mlp_layer_types=(DENSE,) + (SPARSE,) * 6, num_mtp_layers=2
    )
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    for m in model.scanned:  # non-zero correction bias so routing differs from plain top-k
        m.mlp.router.bias.set_value(jax.random.normal(jax.random.key(1), m.mlp.router.bias.shape))
    path = os.path.join(tmp_path_factory.mktemp("ckpt"), "m")
    hf.save_hf(model, path)
    unrolled = hf.load_hf(path, scan_layers=False)
    plan = mimo_jax.layer_plan(model.cfg)
    assert (plan.start, plan.period, plan.repeats) == (1, 3, 2), plan
    assert len(unrolled.scanned) == 0 and len(unrolled.layers) == cfg.num_layers
    return model, unrolled


def _loss(model, ids):
    out = model(ids)
    return jnp.mean(out.logits**2) + sum(jnp.mean(x**2) for x in out.mtp_logits)


def test_scanned_equals_unrolled(scanned_and_unrolled):
    scanned, unrolled = scanned_and_unrolled
    ids = jax.random.randint(jax.random.key(2), (2, 41), 0, 256)
    a, b = jax.jit(lambda m: m(ids))(scanned), jax.jit(lambda m: m(ids))(unrolled)
    for k, (x, y) in enumerate(
        zip([a.logits, *a.mtp_logits], [b.logits, *b.mtp_logits], strict=True)
    ):
        assert_close(x, y, FP32_REL, f"scanned vs unrolled logits {k}")
    np.testing.assert_array_equal(a.aux["routing"], b.aux["routing"])

    # Gradients: map both gradient trees onto HF tensor names and compare tensor by tensor.
    def grads_by_name(model):
        grads = jax.jit(nnx.grad(_loss))(model, ids)
        gd, _, rest = nnx.split(model, nnx.Param, ...)
        return dict(hf._hf_tensors(nnx.merge(gd, grads, rest)))

    ga, gb = grads_by_name(scanned), grads_by_name(unrolled)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert_close(ga[name], gb[name], FP32_REL, f"scanned vs unrolled grad {name}")


def test_mtp_chain_semantics():
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=3)
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (2, 23), 0, 256)
    out = model(ids)
    assert len(out.mtp_logits) == 3 and out.mtp_logits[0].shape == (2, 23, 256)
    # Depth k at position i reads the token i + k + 1 at position i + k + 1, and h_prev.
    pos = jnp.broadcast_to(jnp.arange(23), (2, 23))
    h = out.hidden
    for k in range(3):
        emb = model.embed_tokens(jnp.roll(ids, -(k + 1), axis=1))
        h, _ = model.mtp[k](emb, h, pos + k + 1)
        assert_close(out.mtp_logits[k], model.logits(h), 0.0, f"mtp_logits[{k}] by hand")
    # Causality: changing token j leaves depth k's outputs before j - k - 1 unchanged.
    j = 15
    ids2 = ids.at[:, j].set((ids[:, j] + 1) % 256)
    out2 = model(ids2)
    np.testing.assert_array_equal(out.logits[:, :j], out2.logits[:, :j])
    assert np.max(np.abs(out.logits[:, j] - out2.logits[:, j])) > 0
    for k in range(3):
        np.testing.assert_array_equal(
            out.mtp_logits[k][:, : j - k - 1], out2.mtp_logits[k][:, : j - k - 1]
        )
        assert (
            np.max(np.abs(out.mtp_logits[k][:, j - k - 1] - out2.mtp_logits[k][:, j - k - 1])) > 0
        )


def test_params_carry_logical_axes():
    model = mimo_jax.MiMoV2Flash(mimo_jax.tiny(), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.ndim, (path, axes, var.shape)
        if path[0] == "scanned":
            assert axes[0] == "layers", path
    q = model.scanned[0].self_attn.q_proj.kernel
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert model.scanned[1].mlp.wi_gate.get_metadata()["out_sharding"][:2] == ("layers", "exp")
    assert model.layers[0].mlp.gate_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_bfloat16_close_to_float32():
    """bf16 compute stays within bf16 rounding of fp32 compute on the same weights.

    The weights are bf16-representable, so the two models differ only in the activations'
    dtype and in what the code keeps in fp32. The fp32 model's expert choice is replayed: with
    bf16 activations a near-tied router score may legitimately pick the other expert, which
    moves a few logits by far more than rounding. (The router's own fp32 upcast is checked where
    both dtypes see the same input: test_moe.test_bfloat16_routes_as_float32; RMSNorm's by
    test_rmsnorm_normalises_bf16_in_fp32.)
    """
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1)
    graphdef, state = nnx.split(random_model(cfg, seed=3))
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), state)
    f32 = nnx.merge(graphdef, state)
    b16_abstract = nnx.eval_shape(
        lambda: mimo_jax.MiMoV2Flash(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    )
    b16 = nnx.merge(nnx.graphdef(b16_abstract), state)
    ids = jax.random.randint(jax.random.key(3), (2, 19), 0, 256)
    a = f32(ids)
    b = b16(ids, routing=a.aux["routing"])
    assert b.logits.dtype == b.mtp_logits[0].dtype == jnp.float32
    assert_close(b.logits, a.logits, BF16_REL, "bf16 vs fp32 logits")
    assert_close(b.mtp_logits[0], a.mtp_logits[0], BF16_REL, "bf16 vs fp32 mtp_logits[0]")


def test_rmsnorm_normalises_bf16_in_fp32():
    """bf16 input is normalised in fp32 and rounded once before the weight multiply, as
    transformers does: the output is bf16(w * bf16(x / rms(x))) with the inner value exact.
    Normalising in bf16 rounds x * x, the rsqrt and the product as well, ~1e-2 off."""
    rng = np.random.default_rng(0)
    # [256, 64] rows spanning e^-4 .. e^4 in scale: the result must not depend on it.
    x = rng.standard_normal((256, 64)) * np.exp(rng.uniform(-4, 4, (256, 1)))
    x = jnp.asarray(x, jnp.bfloat16)
    norm = RMSNorm(64, eps=1e-6, param_dtype=jnp.float32)
    w = jnp.asarray(1 + 0.2 * rng.standard_normal(64), jnp.bfloat16)
    norm.scale.set_value(w.astype(jnp.float32))
    got = norm(x)
    assert got.dtype == jnp.bfloat16

    def bf16(a):
        return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)

    xf = np.asarray(x, np.float64)
    y = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)  # [256, 64] fp64
    want = bf16(np.asarray(w, np.float64) * bf16(y))
    # One bf16 step (2^-8 of the value) covers a y whose fp32 and fp64 values round to
    # different bf16 neighbours.
    assert_close(got, want, 2**-8, "bf16 RMSNorm vs fp64 spec")


def test_pallas_attention_model_matches_xla():
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1, sliding_window=11)
    xla_model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    pallas_model = mimo_jax.MiMoV2Flash(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
    nnx.update(pallas_model, nnx.state(xla_model))
    ids = jax.random.randint(jax.random.key(2), (2, 37), 0, 256)
    (la, ga), (lb, gb) = (
        jax.jit(nnx.value_and_grad(_loss))(m, ids) for m in (xla_model, pallas_model)
    )
    assert_close(lb, la, FP32_REL, "pallas vs xla loss")
    gb = dict(nnx.to_flat_state(gb))
    for path, a in nnx.to_flat_state(ga):
        assert_close(gb[path][...], a[...], FP32_REL, f"pallas vs xla grad {path}")
    a, b = xla_model(ids), pallas_model(ids)
    assert_close(b.logits, a.logits, FP32_REL, "pallas vs xla logits")
