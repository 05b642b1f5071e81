"""Backward kernels of the Pallas TPU flash attention of ``flash.py`` (FlashAttention-2,
Algorithm 2).

The probabilities are recomputed from q, k and the forward's logsumexp (which already contains
the sink term, so p = exp(s - lse) is the sink-aware softmax). With delta = rowsum(dO * O):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

Two kernels, each visiting only blocks inside the causal window (bounds from ``flash_common``):

* dq: program per (b, n, q block); folds the q block's window kv blocks (as the forward).
* dk/dv: program per (b, kv head, kv block); folds every query head of the group and every q block
  whose window reaches the kv block, so dK and dV are produced per kv head directly and repeated
  kv heads are never materialised.

Sink gradient. With Z = exp(sink) + sum_j exp(s_j), p_j = exp(s_j) / Z and
p_sink = exp(sink) / Z = exp(sink - lse):

    d p_j / d sink = -p_j * p_sink
    dL / d sink    = sum_j (dO . v_j) * (-p_j * p_sink) = -p_sink * (dO . sum_j p_j v_j)
                   = -p_sink * (dO . O) = -p_sink * delta

summed over batch and query rows of the head. It needs only lse and delta, O(B * N * T), so it is
computed in XLA next to delta rather than in a kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash_common as common
from pallas_kernels.flash_common import NT_DIMS, TN_DIMS, FlashConfig, div, precision, visible


def _recompute(q, k, v, do, lse, delta, mask, *, scale):
    """Shared block math: probabilities and the softmax-backward logits gradient.

    Args:
      q: [bq, H]; k: [bk, H]; v: [bk, P]; do: [bq, P]; lse, delta: f32 [bq, 1]; mask: [bq, bk].
      scale: logit scale.

    Returns:
      p, ds: f32 [bq, bk] (ds without the final ``scale``).
    """
    f32 = jnp.float32
    s = lax.dot_general(q, k, NT_DIMS, precision=precision(q), preferred_element_type=f32) * scale
    # lse is +inf for rows that saw nothing, so p is 0 there without a special case.
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = lax.dot_general(do, v, NT_DIMS, precision=precision(v), preferred_element_type=f32)
    return p, p * (dp - delta)


def _q_positions(cfg, qi, bq):
    return cfg.kv_len - cfg.q_len + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)


def _mask(cfg, q_pos, kv_pos):
    # q_pos < kv_len drops padded query rows (they are also zero in dO, so this is belt and braces).
    return visible(q_pos, kv_pos, causal=cfg.causal, window=cfg.window, kv_len=cfg.kv_len) & (
        q_pos < cfg.kv_len
    )


# --------------------------------------------------------------------------------------------
# dq kernel.
# --------------------------------------------------------------------------------------------


def flash_dq_kernel(
    q_ref,  # [bq, H]
    k_ref,  # [bk, H]
    v_ref,  # [bk, P]
    do_ref,  # [bq, P]
    lse_ref,  # [bq, 1] f32
    delta_ref,  # [bq, 1] f32
    dq_ref,  # [bq, H]
    dq_scratch,  # [bq, H] f32
    *,
    cfg,
):
    """Program (b, n, qi, j) adds the j-th window kv block's term to dq."""
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    qi, j = pl.program_id(2), pl.program_id(3)
    lo, hi = common.kv_block_bounds(qi, **cfg.fwd_bounds_kwargs())
    ki = lo + j

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros_like(dq_scratch)

    @pl.when(ki <= hi)
    def _step():
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = _mask(cfg, _q_positions(cfg, qi, bq), kv_pos)
        k = k_ref[...]
        _, ds = _recompute(
            q_ref[...],
            k,
            v_ref[...],
            do_ref[...],
            lse_ref[...],
            delta_ref[...],
            mask,
            scale=cfg.scale,
        )
        dq_scratch[...] += jnp.dot(
            ds.astype(k.dtype), k, precision=precision(k), preferred_element_type=jnp.float32
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        dq_ref[...] = (dq_scratch[...] * cfg.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------
# dk / dv kernel.
# --------------------------------------------------------------------------------------------


def _dkdv_step(q, k, v, do, lse, delta, mask, dk, dv, *, scale):
    """Adds one q block's contribution to a kv block's (dk, dv) f32 accumulators."""
    p, ds = _recompute(q, k, v, do, lse, delta, mask, scale=scale)
    f32 = jnp.float32
    dv += lax.dot_general(
        p.astype(do.dtype), do, TN_DIMS, precision=precision(do), preferred_element_type=f32
    )
    dk += lax.dot_general(
        ds.astype(q.dtype), q, TN_DIMS, precision=precision(q), preferred_element_type=f32
    )
    return dk, dv


def flash_dkdv_kernel(
    q_ref,  # [bq, H] of query head kh * G + g
    k_ref,  # [bk, H]
    v_ref,  # [bk, P]
    do_ref,  # [bq, P]
    lse_ref,  # [bq, 1] f32
    delta_ref,  # [bq, 1] f32
    dk_ref,  # [bk, H]
    dv_ref,  # [bk, P]
    dk_scratch,  # [bk, H] f32
    dv_scratch,  # [bk, P] f32
    *,
    cfg,
    q_steps: int,
):
    """Program (b, kh, ki, t) folds q block ``lo + t % q_steps`` of query head
    ``kh * G + t // q_steps`` into kv block ki's gradients."""
    bq, bk = cfg.block_sizes.block_q_dkv, cfg.block_sizes.block_kv_dkv
    ki, t = pl.program_id(2), pl.program_id(3)
    lo, hi = common.q_block_bounds(ki, **cfg.dkdv_bounds_kwargs())
    qi = lo + lax.rem(t, q_steps)

    @pl.when(t == 0)
    def _init():
        dk_scratch[...] = jnp.zeros_like(dk_scratch)
        dv_scratch[...] = jnp.zeros_like(dv_scratch)

    @pl.when(qi <= hi)
    def _step():
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = _mask(cfg, _q_positions(cfg, qi, bq), kv_pos)
        dk, dv = _dkdv_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            do_ref[...],
            lse_ref[...],
            delta_ref[...],
            mask,
            dk_scratch[...],
            dv_scratch[...],
            scale=cfg.scale,
        )
        dk_scratch[...] = dk
        dv_scratch[...] = dv

    @pl.when(t == pl.num_programs(3) - 1)
    def _store():
        dk_ref[...] = (dk_scratch[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_calls.
# --------------------------------------------------------------------------------------------


def _dq_call(q, k, v, do, lse, delta, cfg: FlashConfig):
    """dq [B, N, Tp, H] from kernel-layout operands (shapes as in ``flash._forward_call``)."""
    b, n, tp, h = q.shape
    kv_heads, p = k.shape[1], v.shape[3]
    g = n // kv_heads
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    bounds = functools.partial(common.kv_block_bounds, **cfg.fwd_bounds_kwargs())

    def kv_index(bi, ni, qi, j):
        lo, hi = bounds(qi)
        return bi, div(ni, g), jnp.minimum(lo + j, jnp.maximum(hi, lo)), 0

    def q_index(bi, ni, qi, j):
        return bi, ni, qi, 0

    row_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    return pl.pallas_call(
        functools.partial(flash_dq_kernel, cfg=cfg),
        grid=(b, n, tp // bq, common.num_kv_steps(**cfg.fwd_bounds_kwargs())),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), q_index),
            pl.BlockSpec((None, None, bk, h), kv_index),
            pl.BlockSpec((None, None, bk, p), kv_index),
            pl.BlockSpec((None, None, bq, p), q_index),
            row_spec,
            row_spec,
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), q_index),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[common.scratch((bq, h))],
        compiler_params=common.compiler_params(
            cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="mimo_flash_dq",
    )(q, k, v, do, lse, delta)


def _dkdv_call(q, k, v, do, lse, delta, cfg: FlashConfig):
    """(dk [B, K, Sp, H], dv [B, K, Sp, P]) from kernel-layout operands."""
    b, n, tp, h = q.shape
    kv_heads, sp, p = k.shape[1], k.shape[2], v.shape[3]
    g = n // kv_heads
    bq, bk = cfg.block_sizes.block_q_dkv, cfg.block_sizes.block_kv_dkv
    bounds = functools.partial(common.q_block_bounds, **cfg.dkdv_bounds_kwargs())
    q_steps = common.num_q_steps(**cfg.dkdv_bounds_kwargs())

    def q_index(bi, kh, ki, t):
        lo, hi = bounds(ki)
        qi = jnp.minimum(lo + lax.rem(t, q_steps), jnp.maximum(hi, lo))
        return bi, kh * g + div(t, q_steps), qi, 0

    def kv_index(bi, kh, ki, t):
        return bi, kh, ki, 0

    row_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    return pl.pallas_call(
        functools.partial(flash_dkdv_kernel, cfg=cfg, q_steps=q_steps),
        grid=(b, kv_heads, sp // bk, g * q_steps),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), q_index),
            pl.BlockSpec((None, None, bk, h), kv_index),
            pl.BlockSpec((None, None, bk, p), kv_index),
            pl.BlockSpec((None, None, bq, p), q_index),
            row_spec,
            row_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bk, h), kv_index),
            pl.BlockSpec((None, None, bk, p), kv_index),
        ],
        out_shape=(
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ),
        scratch_shapes=[common.scratch((bk, h)), common.scratch((bk, p))],
        compiler_params=common.compiler_params(
            cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="mimo_flash_dkdv",
    )(q, k, v, do, lse, delta)


def flash_backward(q, k, v, sinks, out, lse, do, cfg: FlashConfig):
    """Cotangents of ``flash.flash_attention`` for its custom VJP.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, P]; sinks: [N].
      out: [B, T, N, P] forward output; lse: [B, N, Tp, 1] f32 forward logsumexp (with sinks).
      do: [B, T, N, P] output cotangent.
      cfg: the forward's configuration.

    Returns:
      (dq, dk, dv, dsinks) shaped and typed like (q, k, v, sinks).
    """
    t = q.shape[1]
    qk, kk, vk = common.prepare(q, k, v, cfg)
    tp = qk.shape[2]
    # delta_i = dO_i . O_i = sum_j p_ij (dO_i . v_j); fp32, padded rows get 0.
    delta = jnp.einsum("btnp,btnp->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))[..., None]  # [B, N, Tp, 1]
    dok = common.to_kernel_layout(do.astype(q.dtype), tp)  # [B, N, Tp, P]
    dq = _dq_call(qk, kk, vk, dok, lse, delta, cfg)
    dk, dv = _dkdv_call(qk, kk, vk, dok, lse, delta, cfg)
    dq = common.from_kernel_layout(dq, t)
    dk = common.from_kernel_layout(dk, k.shape[1])
    dv = common.from_kernel_layout(dv, v.shape[1])
    # dsinks[n] = -sum_{b, i} exp(sink_n - lse_bni) * delta_bni (derivation in the module doc).
    lse_rows, delta_rows = lse[:, :, :t, 0], delta[:, :, :t, 0]  # [B, N, T]
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_rows)
    dsinks = -jnp.sum(p_sink * delta_rows, axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, dsinks
