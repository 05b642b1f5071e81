"""Mosaic GPU (Hopper, sm90) decode / verify attention over a position-tagged KV cache.

The ``flash_decode.py`` kernel for ``jax.experimental.pallas.mosaic_gpu``: a few new queries
(T = 1 for plain decode, up to num_mtp_layers + 1 for speculative verify) attend to a cache of S
slots whose absolute positions come from ``kv_positions`` (negative = empty), so a ring buffer of
``sliding_window + 4`` slots works unchanged: visibility is the ``reference.visibility_mask`` rule
evaluated per (query, slot) from the positions, never from slot order.

* Rows: the G query heads of a kv head and the T queries are stacked into the rows of one
  64-row wgmma tile (row r = g * T + t, MiMo-V2-Flash: G * T <= 8 * 4 = 32); more rows take more
  tiles. Each kv block is read once per (kv head, row tile).
* Split-KV (FlashDecoding): a batch row has only K kv heads, far fewer CTAs than SMs, so the cache
  blocks are split over ``num_splits`` CTAs. Each CTA runs one compute warpgroup fed by one TMA
  memory warpgroup through a ``stages``-deep SMEM ring, and writes its normalised partial output
  and natural-log logsumexp; XLA merges the splits and the sink column (an extra softmax term with
  no value vector) with a logsumexp-weighted sum.
* Masked entries get probability exactly 0 (not exp(MASK - MASK)), because a split may see no key
  at all; such a split reports lse = MASK_VALUE and drops out of the merge.

Forward only: serving does not differentiate through the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import flash_mgpu_common as fm
from pallas_kernels.flash_common import forward_only, pad_axis

__all__ = ["decode_attention_mgpu"]

ROWS = 64  # wgmma's M per warpgroup
# Enough CTAs to cover an H100/H200 (132 SMs) about twice when picking num_splits.
TARGET_CTAS = 264


def _decode_kernel(
    q_ref,  # [B, K, Rp, H] GMEM: stacked rows of the G heads x T queries of each kv head
    q_pos_ref,  # [B, Rp] int32 GMEM: per-row query positions
    k_ref,  # [B, Sp, K, H] GMEM
    v_ref,  # [B, Sp, K, P] GMEM
    kv_pos_ref,  # [B, Sp] int32 GMEM: slot positions, -1 = empty or padding
    o_ref,  # [splits, B, K, Rp, P] GMEM: normalised partial outputs
    lse_ref,  # [splits, B, K, Rp] f32 GMEM: partial natural-log logsumexp
    scoped,
    *,
    causal,
    window,
    scale,
    row_tiles,
    blocks_per_split,
    num_blocks,
    bk,
    stages,
    interpret,
):
    (q_smem, o_smem, qpos_smem, lse_smem, k_smem, v_smem, pos_smem), barriers = scoped
    q_bar, qpos_bar, k_bars, pos_bars, v_bars, k_free, v_free = barriers
    b, split, cell = lax.axis_index("batch"), lax.axis_index("split"), lax.axis_index("rows")
    wg = lax.axis_index("wg")
    kh = lax.div(cell, jnp.asarray(row_tiles, cell.dtype))
    rows = pl.ds(lax.rem(cell, jnp.asarray(row_tiles, cell.dtype)) * ROWS, ROWS)
    first = split * blocks_per_split
    n_steps = jnp.minimum(blocks_per_split, num_blocks - first)  # >= 1 by construction

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(q_ref.at[b, kh, rows], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(q_pos_ref.at[b, rows], qpos_smem, qpos_bar)
        plgpu.barrier_wait(q_bar)
        plgpu.barrier_wait(qpos_bar)
        acc_layout, row_layout = (None, None) if interpret else fm.layouts()
        q_pos = fm.load_vector(qpos_smem, interpret)  # [ROWS] int32
        q_pos = lax.broadcast_in_dim(q_pos, (ROWS, bk), [0])  # [ROWS, bk]
        m = fm.hint(jnp.full((ROWS,), fm.MASK_VALUE, jnp.float32), row_layout, interpret)
        l = fm.hint(jnp.zeros((ROWS,), jnp.float32), row_layout, interpret)
        acc = fm.hint(jnp.zeros((ROWS, o_smem.shape[-1]), jnp.float32), acc_layout, interpret)

        def step(i, carry):
            acc, m, l = carry
            slot = lax.rem(i, jnp.asarray(stages, i.dtype))
            plgpu.barrier_wait(k_bars.at[slot])
            s = fm.matmul_nt(q_smem, k_smem.at[slot], interpret)  # [ROWS, bk] f32
            plgpu.barrier_wait(pos_bars.at[slot])
            kv_pos = fm.load_vector(pos_smem.at[slot], interpret, axis=0)  # [bk] int32
            plgpu.barrier_arrive(k_free.at[slot])  # k and the positions of the slot are read
            kv_pos = lax.broadcast_in_dim(kv_pos, (ROWS, bk), [1])  # [ROWS, bk]
            delta = q_pos - kv_pos
            mask = kv_pos >= 0
            if causal:
                mask &= delta >= 0
            if window is not None:
                mask &= delta < window
            s = jnp.where(mask, s * (scale * fm.LOG2E), fm.MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))  # [ROWS]
            alpha = jnp.exp2(m - m_new)
            p = jnp.where(mask, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bars.at[slot])
            acc = fm.matmul_acc(acc, p.astype(q_smem.dtype), v_smem.at[slot], interpret)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc, m, l = lax.fori_loop(0, n_steps, step, (acc, m, l))
        seen = l > 0  # [ROWS] rows that saw a key in this split
        denom = jnp.where(seen, l, 1.0)
        o_smem[...] = (acc / lax.broadcast_in_dim(denom, acc.shape, [0])).astype(o_smem.dtype)
        lse_smem[...] = jnp.where(seen, m * fm.LN2 + jnp.log(denom), fm.MASK_VALUE)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, b, kh, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, b, kh, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def issue_k(step, slot):
            cols = pl.ds((first + step) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], k_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(kv_pos_ref.at[b, cols], pos_smem.at[slot], pos_bars.at[slot])

        def issue_v(step, slot):
            cols = pl.ds((first + step) * bk, bk)
            plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], v_smem.at[slot], v_bars.at[slot])

        fm.produce(n_steps, stages, [(k_free, issue_k), (v_free, issue_v)])


def _pick_splits(num_blocks: int, ctas_per_split: int, num_splits: int | None) -> tuple[int, int]:
    """(num_splits, blocks_per_split) with every split non-empty."""
    if num_splits is None:
        num_splits = max(1, TARGET_CTAS // ctas_per_split)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    per_split = pl.cdiv(num_blocks, min(num_splits, num_blocks))
    return pl.cdiv(num_blocks, per_split), per_split


def _decode(q, k, v, sinks, q_positions, kv_positions, cfg):
    """The kernel plus the split / sink merge; see ``decode_attention_mgpu``."""
    causal, window, scale, bs, num_splits, interpret = cfg
    b, t, n, h = q.shape
    s, kv_heads, p_dim = k.shape[1], k.shape[2], v.shape[3]
    g = n // kv_heads
    r = g * t
    bk, stages = bs.block_kv_decode, bs.stages
    qr = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, r, h)
    qr = pad_axis(qr, 2, ROWS)  # [B, K, Rp, H]
    rp = qr.shape[2]
    row_tiles = rp // ROWS
    q_pos = jnp.tile(q_positions.astype(jnp.int32), (1, g))  # [B, G * T], row g * T + t
    # Padded rows sit at position -1: causal rows then see nothing; their output is dropped.
    q_pos = jnp.pad(q_pos, ((0, 0), (0, rp - r)), constant_values=-1)  # [B, Rp]
    kv_pos = jnp.pad(kv_positions.astype(jnp.int32), ((0, 0), (0, (-s) % bk)), constant_values=-1)
    kp, vp = pad_axis(k, 1, bk), pad_axis(v, 1, bk)  # [B, Sp, K, *]
    num_blocks = kp.shape[1] // bk
    splits, per_split = _pick_splits(num_blocks, b * kv_heads * row_tiles, num_splits)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((ROWS, h), q.dtype, transforms=tiled),  # q rows
        plgpu.SMEM((ROWS, p_dim), q.dtype, transforms=tiled),  # partial output
        plgpu.SMEM((ROWS,), jnp.int32),  # query positions
        plgpu.SMEM((ROWS,), jnp.float32),  # partial lse
        plgpu.SMEM((stages, bk, h), q.dtype, transforms=tiled),  # k ring
        plgpu.SMEM((stages, bk, p_dim), q.dtype, transforms=tiled),  # v ring
        plgpu.SMEM((stages, bk), jnp.int32),  # slot positions ring
    )
    barriers = (
        plgpu.Barrier(),  # q loaded
        plgpu.Barrier(),  # query positions loaded
        plgpu.Barrier(num_barriers=stages),  # k slot loaded
        plgpu.Barrier(num_barriers=stages),  # slot positions loaded
        plgpu.Barrier(num_barriers=stages),  # v slot loaded
        plgpu.Barrier(num_barriers=stages),  # k + positions slot free
        plgpu.Barrier(num_barriers=stages),  # v slot free
    )
    body = functools.partial(
        _decode_kernel,
        causal=causal,
        window=window,
        scale=scale,
        row_tiles=row_tiles,
        blocks_per_split=per_split,
        num_blocks=num_blocks,
        bk=bk,
        stages=stages,
        interpret=interpret,
    )

    def entry(*refs):
        pl.run_scoped(
            lambda *sc: body(*refs, (sc[: len(scratch)], sc[len(scratch) :])),
            *scratch,
            *barriers,
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((splits, b, kv_heads, rp, p_dim), q.dtype),
            jax.ShapeDtypeStruct((splits, b, kv_heads, rp), jnp.float32),
        ),
        grid=(kv_heads * row_tiles, splits, b),
        grid_names=("rows", "split", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=fm.interpret_params(interpret),
    )(qr, q_pos, kp, vp, kv_pos)

    # Merge: lse = log(exp(sink) + sum_i exp(lse_i)), o = sum_i exp(lse_i - lse) o_i.
    lse = lse[..., :r]  # [splits, B, K, R]
    if sinks is not None:
        row_sinks = jnp.repeat(sinks.astype(jnp.float32).reshape(kv_heads, g), t, axis=1)
        terms = jnp.concatenate([lse, jnp.broadcast_to(row_sinks, lse.shape[1:])[None]], axis=0)
    else:
        terms = lse
    total = jax.nn.logsumexp(terms, axis=0)  # [B, K, R]
    weights = jnp.exp(lse - total[None])  # [splits, B, K, R]
    out = jnp.einsum("zbkr,zbkrp->bkrp", weights, o[:, :, :, :r].astype(jnp.float32))
    out = out.reshape(b, kv_heads, g, t, p_dim).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, P]
    return out.reshape(b, t, n, p_dim).astype(q.dtype)


_decode_op = forward_only(_decode, "Mosaic GPU")


def decode_attention_mgpu(
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
    block_sizes: fm.MgpuBlockSizes | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of a few new queries to a position-tagged KV cache on Hopper (forward only).

    Args:
      q: [B, T, N, H] new queries, bf16 or f16, H a multiple of 64.
      k: [B, S, K, H] cache keys; v: [B, S, K, P] cache values (P a multiple of 64).
      q_positions: int [B, T] absolute positions of the queries.
      kv_positions: int [B, S] absolute positions of the slots, negative for empty slots.
      sinks: optional [N] sink logits.
      sliding_window, causal, scale: as ``pallas_kernels.attention``.
      block_sizes: uses ``block_kv_decode`` (cache slots per pipeline stage) and ``stages``.
      num_splits: CTAs the cache blocks are split over per (batch row, kv head, row tile);
        default: enough to fill about two waves of 132 SMs, at most one per block.
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling for sm90.

    Returns:
      [B, T, N, P] in q's dtype; rows with nothing visible and no sink are 0.
    """
    fm.check_inputs(q, k, v)
    cfg = (
        causal,
        sliding_window,
        float(q.shape[-1] ** -0.5 if scale is None else scale),
        fm.mgpu_block_sizes(block_sizes),
        num_splits,
        interpret,
    )
    return _decode_op(q, k, v, sinks, q_positions, kv_positions, cfg)
