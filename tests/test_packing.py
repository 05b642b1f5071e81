"""Packed rows: with ``segment_ids`` every example of a row (and its MTP depths) computes what it
computes alone, forward and backward, scanned or unrolled; without them it does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close, max_rel_diff

import mimo_jax
from mimo_jax.attention import Attention
from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE
from mimo_jax.post_training.sft_data import SFTBatch, mtp_targets

LENGTHS = (9, 13, 6)  # three examples of one row, longer and shorter than the window
T = 32  # 28 example tokens + 4 padding
WINDOW = 5
MTP = 2


def _config(scan_layers: bool):
    # Dense global layer 0, then (SWA, global) MoE twice: a scanned period holding both kinds.
    types = (FULL, SLIDING, FULL, SLIDING, FULL)
    return mimo_jax.tiny(
        num_layers=5,
        layer_types=types,
        mlp_layer_types=(DENSE,) + (SPARSE,) * 4,
        num_mtp_layers=MTP,
        sliding_window=WINDOW,
        full_attention_sink=True,
        scan_layers=scan_layers,
    )


def _model(scan_layers: bool):
    model = mimo_jax.MiMoV2Flash(_config(scan_layers), rngs=nnx.Rngs(0))
    if scan_layers:
        assert model.plan.repeats == 2, model.plan
    # Sink logits of order one (not the init's 0.02), so that a sink handled wrongly shows.
    keys = iter(jax.random.split(jax.random.key(7), 64))
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Attention):
            m.sinks.set_value(jax.random.normal(next(keys), m.sinks.shape))
    return model


def _packed_and_alone():
    """One packed row (SFTBatch conventions) and the same examples one per right-padded row."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 256, n + 1).astype(np.int32) for n in LENGTHS]  # inputs + last label
    ids, labels = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    positions, segments = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    mask = np.zeros((1, T), np.float32)
    alone_ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    starts = np.cumsum((0,) + LENGTHS)
    for e, (n, s) in enumerate(zip(LENGTHS, starts, strict=False)):
        ids[0, s : s + n], labels[0, s : s + n] = tokens[e][:-1], tokens[e][1:]
        positions[0, s : s + n], segments[0, s : s + n] = np.arange(n), e + 1
        mask[0, s : s + n] = 1.0
        alone_ids[e, :n] = tokens[e][:-1]
    positions[0, starts[-1] :] = np.arange(LENGTHS[-1], LENGTHS[-1] + T - starts[-1])
    batch = SFTBatch(ids, labels, mask, positions, segments)
    # Alone: row e holds example e then padding, which causal attention keeps invisible to it.
    alone_labels = np.zeros_like(alone_ids)
    alone_mask = np.zeros(alone_ids.shape, np.float32)
    for e, n in enumerate(LENGTHS):
        alone_labels[e, :n], alone_mask[e, :n] = tokens[e][1:], 1.0
    return batch, (alone_ids, alone_labels, alone_mask), starts


def _mtp_labels_alone(labels, mask, k):
    """Depth k's labels and mask on the alone rows: the label k + 1 further, inside the example."""
    s = k + 1
    lab, m = np.roll(labels, -s, axis=1), np.zeros_like(mask)
    m[:, :-s] = mask[:, s:]
    return lab, m


def _masked_ce(logits, labels, mask):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(nll * mask)


def _loss(model, ids, positions, segment_ids, targets):
    """Summed (not averaged, so it adds over examples) main + MTP cross-entropy."""
    out = model(ids, positions, segment_ids=segment_ids)
    (labels, mask), *mtp = targets
    loss = _masked_ce(out.logits, labels, mask)
    for x, (lab, m) in zip(out.mtp_logits, mtp, strict=True):
        loss = loss + _masked_ce(x, lab, m)
    return loss


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_row_equals_examples_alone(scan_layers):
    model = _model(scan_layers)
    batch, (a_ids, a_labels, a_mask), starts = _packed_and_alone()
    ids, pos, seg = (jnp.asarray(x) for x in (batch.ids, batch.positions, batch.segment_ids))
    packed_targets = [(batch.labels, batch.loss_mask), *mtp_targets(batch, MTP)]
    alone_targets = [(a_labels, a_mask)]
    alone_targets += [_mtp_labels_alone(a_labels, a_mask, k) for k in range(MTP)]

    def fwd_grad(model, ids, positions, segment_ids, targets):
        out = model(ids, positions, segment_ids=segment_ids)
        grads = nnx.grad(_loss)(model, ids, positions, segment_ids, targets)
        return out.logits, out.mtp_logits, grads

    packed = jax.jit(fwd_grad)(model, ids, pos, seg, packed_targets)
    alone = jax.jit(fwd_grad)(model, jnp.asarray(a_ids), None, None, alone_targets)
    unmasked = jax.jit(lambda m: m(ids, pos).logits)(model)

    assert np.isfinite(packed[0]).all() and all(np.isfinite(x).all() for x in packed[1])
    for e, n in enumerate(LENGTHS):
        s = starts[e]
        assert_close(packed[0][0, s : s + n], alone[0][e, :n], FP32_REL, f"example {e} logits")
        for k in range(MTP):
            m = n - k - 1  # depth k at i consumes token i + k + 1: inside the example for i < m
            assert_close(
                packed[1][k][0, s : s + m], alone[1][k][e, :m], FP32_REL, f"example {e} MTP {k}"
            )
        if e:  # later examples would see the earlier ones without the segment mask
            diff = max_rel_diff(unmasked[0, s : s + n], alone[0][e, :n])
            assert diff > 100 * FP32_REL, f"example {e} without segment_ids: {diff:.3g}"

    # Gradient of the packed row's loss == sum of the examples' (the alone rows are independent,
    # so the gradient of their summed loss is that sum).
    got, want = jax.tree.leaves(packed[2]), jax.tree.leaves(alone[2])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(alone[2])]
    assert len(got) == len(want) > 0
    for path, g, w in zip(paths, got, want, strict=True):
        assert_close(g, w, FP32_REL, f"grad {path}")


def test_segment_ids_need_xla_attention_and_no_cache():
    cfg = mimo_jax.tiny(num_layers=2, num_mtp_layers=1, attention_impl="pallas")
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="attention_impl='pallas'.*needs attention_impl='xla'"):
        model(ids, segment_ids=seg)

    attn = Attention(cfg.replace(attention_impl="xla"), SLIDING, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 8, cfg.embed_dim))
    pos = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="segment_ids is for training forwards"):
        attn(x, pos, attn.init_cache(1, 8, 1), segment_ids=seg)
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]"):
        mimo_jax.MiMoV2Flash(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))(
            ids, segment_ids=seg[:, :4]
        )
