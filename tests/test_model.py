"""Model structure: scanned vs unrolled stacks, MTP semantics, causality, axis metadata."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax import hf
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE


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
    for x, y in zip([a.logits, *a.mtp_logits], [b.logits, *b.mtp_logits], strict=True):
        assert np.all(np.isfinite(x))
        assert np.max(np.abs(x - y)) < 1e-5, np.max(np.abs(x - y))
    np.testing.assert_array_equal(a.aux["routing"], b.aux["routing"])

    # Gradients: map both gradient trees onto HF tensor names and compare tensor by tensor.
    def grads_by_name(model):
        grads = jax.jit(nnx.grad(_loss))(model, ids)
        gd, _, rest = nnx.split(model, nnx.Param, ...)
        return dict(hf._hf_tensors(nnx.merge(gd, grads, rest)))

    ga, gb = grads_by_name(scanned), grads_by_name(unrolled)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert np.all(np.isfinite(ga[name])), name
        diff = np.max(np.abs(ga[name] - gb[name]))
        assert diff < 1e-5, f"{name}: grad max diff {diff}"


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
        want = model.lm_head(h)
        assert np.max(np.abs(out.mtp_logits[k] - want)) < 1e-5
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
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1)
    f32 = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    b16 = mimo_jax.MiMoV2Flash(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (2, 19), 0, 256)
    a, b = f32(ids).logits, b16(ids).logits
    assert b.dtype == jnp.float32 and np.all(np.isfinite(b))
    assert np.max(np.abs(a - b)) < 2e-2, np.max(np.abs(a - b))


def test_pallas_attention_model_matches_xla():
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=1, sliding_window=11)
    xla_model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    pallas_model = mimo_jax.MiMoV2Flash(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
    nnx.update(pallas_model, nnx.state(xla_model))
    ids = jax.random.randint(jax.random.key(2), (2, 37), 0, 256)
    (la, ga), (lb, gb) = (
        jax.jit(nnx.value_and_grad(_loss))(m, ids) for m in (xla_model, pallas_model)
    )
    assert np.isfinite(lb) and abs(float(la) - float(lb)) < 1e-5, (la, lb)
    for path, a in nnx.to_flat_state(ga):
        b = dict(nnx.to_flat_state(gb))[path]
        assert np.all(np.isfinite(b[...])), path
        diff = np.max(np.abs(a[...] - b[...]))
        assert diff < 1e-4, f"{path}: grad max diff {diff}"
    a, b = xla_model(ids), pallas_model(ids)
    assert np.max(np.abs(a.logits - b.logits)) < 1e-4
