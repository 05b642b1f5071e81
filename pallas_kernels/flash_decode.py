"""Pallas TPU decode / verify attention over a KV cache whose slots carry absolute positions.

A few new queries (T = 1 for plain decode, 2..5 for speculative verify) attend to a cache of S
slots. Slot positions come from ``kv_positions`` (negative = empty), so a ring buffer of
``sliding_window + 4`` slots, whose positions are not sorted, works unchanged: visibility is the
``reference.visibility_mask`` rule evaluated per (query, slot) from the positions, never from
slot order.

All G query heads of a kv head and all T queries are stacked into the rows of one tile
([G * T, H], row r = g * T + t), so each kv block is read once per kv head and the matmuls have
G * T rows instead of T. Each program folds the cache blocks with the same online-softmax step as
the prefill kernel (``flash_common.online_softmax_step``), the running max starting at the row's
sink.
The cache is small (a window or one sequence), so every block is visited; there is no window
skipping here because slot order says nothing about position.

Forward only: serving does not differentiate through the cache. The Mosaic GPU counterpart is
``flash_mgpu_decode``; ``pallas_kernels.attention`` chooses between them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import flash_common as common


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    causal: bool
    window: int | None
    scale: float
    has_sinks: bool
    block_kv: int
    interpret: bool


def flash_decode_kernel(
    sinks_ref,  # [R, 1] f32 or None
    q_pos_ref,  # [R, 1] int32
    kv_pos_ref,  # [1, bk] int32
    q_ref,  # [R, H]
    k_ref,  # [bk, H]
    v_ref,  # [bk, P]
    o_ref,  # [R, P]
    m_scratch,  # [R, 1] f32
    l_scratch,  # [R, 1] f32
    acc_scratch,  # [R, P] f32
    *,
    cfg: _DecodeConfig,
):
    """Program (b, kh, j) folds cache block j into the rows of kv head kh."""
    j = pl.program_id(2)
    rows = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m, l = common.init_stats(None if sinks_ref is None else sinks_ref[...], rows)
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = jnp.zeros_like(acc_scratch)

    mask = common.visible(q_pos_ref[...], kv_pos_ref[...], causal=cfg.causal, window=cfg.window)
    common.online_softmax_update(
        q_ref, k_ref, v_ref, mask, m_scratch, l_scratch, acc_scratch, scale=cfg.scale
    )

    @pl.when(j == pl.num_programs(2) - 1)
    def _store():
        o, _ = common.finalize(m_scratch[...], l_scratch[...], acc_scratch[...])
        o_ref[...] = o.astype(o_ref.dtype)


def _decode_call(sinks, q_pos, kv_pos, q, k, v, cfg: _DecodeConfig):
    """Runs the decode kernel on stacked operands.

    Args:
      sinks: [K, R, 1] f32 per-row sink logits.
      q_pos: [B, R, 1] int32 per-row query positions.
      kv_pos: [B, 1, Sp] int32 slot positions, -1 for empty and padded slots.
      q: [B, K, R, H] rows of the G heads x T queries of each kv head.
      k: [B, K, Sp, H]; v: [B, K, Sp, P].
      cfg: static configuration.

    Returns:
      [B, K, R, P] in q's dtype.
    """
    b, kv_heads, r, h = q.shape
    sp, p = k.shape[2], v.shape[3]
    bk = cfg.block_kv
    in_specs = [
        pl.BlockSpec((None, r, 1), lambda bi, kh, j: (kh, 0, 0)),
        pl.BlockSpec((None, r, 1), lambda bi, kh, j: (bi, 0, 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, kh, j: (bi, 0, j)),
        pl.BlockSpec((None, None, r, h), lambda bi, kh, j: (bi, kh, 0, 0)),
        pl.BlockSpec((None, None, bk, h), lambda bi, kh, j: (bi, kh, j, 0)),
        pl.BlockSpec((None, None, bk, p), lambda bi, kh, j: (bi, kh, j, 0)),
    ]
    operands = [sinks, q_pos, kv_pos, q, k, v]
    if cfg.has_sinks:
        body = functools.partial(flash_decode_kernel, cfg=cfg)
    else:
        operands, in_specs = operands[1:], in_specs[1:]
        body = functools.partial(flash_decode_kernel, None, cfg=cfg)
    return pl.pallas_call(
        body,
        grid=(b, kv_heads, sp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, r, p), lambda bi, kh, j: (bi, kh, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, r, p), q.dtype),
        scratch_shapes=[common.scratch((r, 1)), common.scratch((r, 1)), common.scratch((r, p))],
        compiler_params=common.compiler_params(
            cfg.interpret, ("parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="mimo_flash_decode",
    )(*operands)


def _decode_impl(q, k, v, sinks, q_positions, kv_positions, cfg: _DecodeConfig):
    b, t, n, h = q.shape
    s, kv_heads, p = k.shape[1], k.shape[2], v.shape[3]
    g = n // kv_heads
    r = g * t
    qr = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, r, h)
    qr = common.pad_axis(qr, 2, 8)  # [B, K, Rp, H]: rows padded to 8 sublanes
    rp = qr.shape[2]
    q_pos = jnp.tile(q_positions.astype(jnp.int32), (1, g))  # [B, G * T], row g * T + t
    q_pos = jnp.pad(q_pos, ((0, 0), (0, rp - r)), constant_values=-1)[..., None]  # [B, Rp, 1]
    row_sinks = common.sinks_operand(sinks, n).reshape(kv_heads, g, 1)
    row_sinks = jnp.repeat(row_sinks, t, axis=1)  # [K, G * T, 1]
    row_sinks = jnp.pad(row_sinks, ((0, 0), (0, rp - r), (0, 0)))  # [K, Rp, 1]
    kv_pos = kv_positions.astype(jnp.int32)
    kv_pos = jnp.pad(kv_pos, ((0, 0), (0, (-s) % cfg.block_kv)), constant_values=-1)[:, None]
    kk = common.to_kernel_layout(k, cfg.block_kv)  # [B, K, Sp, H]
    vk = common.to_kernel_layout(v, cfg.block_kv)  # [B, K, Sp, P]
    o = _decode_call(row_sinks, q_pos, kv_pos, qr, kk, vk, cfg)  # [B, K, Rp, P]
    o = o[:, :, :r].reshape(b, kv_heads, g, t, p)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, p)  # [B, T, N, P]


_decode = common.forward_only(_decode_impl, "Pallas")


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: common.BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of a few new queries to a position-tagged KV cache (forward only).

    Args:
      q: [B, T, N, H] new queries (T small: 1 for decode, a few for speculative verify).
      k: [B, S, K, H] cache keys; v: [B, S, K, P] cache values.
      q_positions: int [B, T] absolute positions of the queries.
      kv_positions: int [B, S] absolute positions of the slots, negative for empty slots.
      sinks: optional [N] sink logits.
      sliding_window, causal, scale: as ``pallas_kernels.attention``.
      block_sizes: uses ``block_kv_decode`` (cache slots per tile), default ``BlockSizes()``.
      interpret: run in the Pallas interpreter (any backend) instead of compiling for Mosaic TPU.

    Returns:
      [B, T, N, P] in q's dtype; rows with nothing visible and no sink are 0.
    """
    block_sizes = block_sizes or common.BlockSizes()
    if not isinstance(block_sizes, common.BlockSizes):
        raise ValueError(
            f"the Pallas TPU kernels take flash_common.BlockSizes, got {block_sizes!r}"
        )
    cfg = _DecodeConfig(
        causal=causal,
        window=sliding_window,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        has_sinks=sinks is not None,
        block_kv=block_sizes.block_kv_decode,
        interpret=interpret,
    )
    if sinks is None:
        sinks = jnp.zeros((q.shape[2],), jnp.float32)
    return _decode(q, k, v, sinks, q_positions, kv_positions, cfg)
