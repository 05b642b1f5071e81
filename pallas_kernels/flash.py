"""Pallas TPU flash attention for MiMo-V2-Flash: causal sliding window, per-head sinks, GQA, H != P.

FlashAttention-2 (Dao, 2023) with two changes for sink attention: the running max of each row is
initialised to its head's sink logit and the running denominator to exp(sink - sink) = 1, so the
sink is an extra softmax column that is never masked and has no value vector.

The kernel only ever visits kv blocks that intersect the causal window of a query block:
``kv_block_bounds`` gives the first and last such block, and the same helper sizes the grid
(``num_kv_steps``), so a sliding-window layer costs O(T * (bq + W)) instead of O(T * S). Query head
n reads kv head n // G straight from the kv arrays through the BlockSpec index map; repeated kv
heads are never materialised.

Schedule: grid (B, N, q blocks, kv steps), the kv axis sequential ("arbitrary"), running max /
denominator / accumulator in scratch (Mosaic TPU; the Pallas interpreter on CPU). The kv BlockSpec
index map returns the window's blocks, clamped so that steps past the window re-use the last block
(no new DMA) and are skipped with ``pl.when``.

``flash_attention`` is the differentiable op: this module's forward kernel and the backward kernels
of ``flash_bwd`` behind one custom VJP. ``pallas_kernels.attention`` chooses it (or another kernel);
the block math shared with the backward and decode kernels is in ``flash_common``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash_bwd
from pallas_kernels.flash_common import (
    BlockSizes,
    FlashConfig,
    compiler_params,
    div,
    finalize,
    from_kernel_layout,
    init_stats,
    kv_block_bounds,
    num_kv_steps,
    online_softmax_update,
    prepare,
    scratch,
    sinks_operand,
    visible,
)

__all__ = ["flash_attention"]


def flash_fwd_kernel(
    sinks_ref,  # [1, 1] f32 or None
    q_ref,  # [bq, H]
    k_ref,  # [bk, H]
    v_ref,  # [bk, P]
    o_ref,  # [bq, P]
    lse_ref,  # [bq, 1] f32
    m_scratch,  # [bq, 1] f32
    l_scratch,  # [bq, 1] f32
    acc_scratch,  # [bq, P] f32
    *,
    cfg: FlashConfig,
):
    """Program (b, n, qi, j) folds the j-th window kv block of q block qi."""
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    qi, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_bounds(qi, **cfg.fwd_bounds_kwargs())
    ki = lo + j

    @pl.when(j == 0)
    def _init():
        m, l = init_stats(None if sinks_ref is None else sinks_ref[...], bq)
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = jnp.zeros_like(acc_scratch)

    @pl.when(ki <= hi)
    def _step():
        q_pos = cfg.kv_len - cfg.q_len + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = visible(q_pos, kv_pos, causal=cfg.causal, window=cfg.window, kv_len=cfg.kv_len)
        online_softmax_update(
            q_ref, k_ref, v_ref, mask, m_scratch, l_scratch, acc_scratch, scale=cfg.scale
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        o, lse = finalize(m_scratch[...], l_scratch[...], acc_scratch[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _forward_call(q, k, v, sinks, cfg: FlashConfig):
    """Runs the forward kernel on kernel-layout operands.

    Args:
      q: [B, N, Tp, H]; k: [B, K, Sp, H]; v: [B, K, Sp, P] (sequences padded to tiles).
      sinks: [N, 1, 1] f32.
      cfg: static configuration.

    Returns:
      o [B, N, Tp, P] in q's dtype and lse [B, N, Tp, 1] f32 (sink term included).
    """
    b, n, tp, h = q.shape
    kv_heads, p = k.shape[1], v.shape[3]
    g = n // kv_heads
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    bounds = functools.partial(kv_block_bounds, **cfg.fwd_bounds_kwargs())

    def kv_index(bi, ni, qi, j):
        lo, hi = bounds(qi)
        # Steps past the window repeat the last block: same index, so no new copy is issued.
        return bi, div(ni, g), jnp.minimum(lo + j, jnp.maximum(hi, lo)), 0

    def q_index(bi, ni, qi, j):
        return bi, ni, qi, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, h), q_index),
        pl.BlockSpec((None, None, bk, h), kv_index),
        pl.BlockSpec((None, None, bk, p), kv_index),
    ]
    operands = [q, k, v]
    if cfg.has_sinks:
        in_specs = [pl.BlockSpec((None, 1, 1), lambda bi, ni, qi, j: (ni, 0, 0)), *in_specs]
        operands = [sinks, *operands]
        body = functools.partial(flash_fwd_kernel, cfg=cfg)
    else:
        body = functools.partial(flash_fwd_kernel, None, cfg=cfg)
    return pl.pallas_call(
        body,
        grid=(b, n, tp // bq, num_kv_steps(**cfg.fwd_bounds_kwargs())),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, p), q_index),
            pl.BlockSpec((None, None, bq, 1), q_index),
        ],
        out_shape=(
            jax.ShapeDtypeStruct((b, n, tp, p), q.dtype),
            jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
        ),
        scratch_shapes=[scratch((bq, 1)), scratch((bq, 1)), scratch((bq, p))],
        compiler_params=compiler_params(
            cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="mimo_flash_fwd",
    )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, sinks, cfg: FlashConfig):
    return _flash_fwd(q, k, v, sinks, cfg)[0]


def _flash_fwd(q, k, v, sinks, cfg: FlashConfig):
    qk, kk, vk = prepare(q, k, v, cfg)
    o, lse = _forward_call(qk, kk, vk, sinks_operand(sinks, q.shape[2]), cfg)
    out = from_kernel_layout(o, q.shape[1])  # [B, T, N, P]
    return out, (q, k, v, sinks, out, lse)


def _flash_bwd(cfg: FlashConfig, res, do):
    q, k, v, sinks, out, lse = res
    return flash_bwd.flash_backward(q, k, v, sinks, out, lse, do, cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array | None = None,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Prefill / training flash attention with default positions (queries are the last T keys).

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys (N a multiple of K).
      v: [B, S, K, P] values.
      sinks: optional [N] sink logits.
      sliding_window: visible keys per query counting itself, or None for global attention.
      causal: mask keys after the query.
      scale: logit scale, default H ** -0.5.
      block_sizes: tiles, default ``BlockSizes()``.
      interpret: run in the Pallas interpreter (any backend) instead of compiling for Mosaic TPU.

    Returns:
      [B, T, N, P] in q's dtype; differentiable in q, k, v and sinks.
    """
    block_sizes = block_sizes or BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(
            f"the Pallas TPU kernels take flash_common.BlockSizes, got {block_sizes!r}"
        )
    cfg = FlashConfig(
        q_len=q.shape[1],
        kv_len=k.shape[1],
        causal=causal,
        window=sliding_window,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        has_sinks=sinks is not None,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    if sinks is None:
        # A stand-in so the custom VJP has a fixed signature; its cotangent is dropped.
        sinks = jnp.zeros((q.shape[2],), jnp.float32)
    return _flash(q, k, v, sinks, cfg)
