"""Mosaic GPU (Hopper, sm90) flash attention of MiMo-V2-Flash: forward kernel and custom VJP.

The same math as ``flash.py`` (FlashAttention-2 with the sink folded into the running max: the row
max starts at the head's sink logit and the denominator at exp(sink - sink) = 1), written for
``jax.experimental.pallas.mosaic_gpu`` in the FlashAttention-3 shape of
``jax.experimental.pallas.ops.gpu.attention_mgpu``:

* one CTA per (query head, 2 * block_q query rows, batch row), three warpgroups: two compute
  warpgroups (block_q rows each) and one memory warpgroup that streams kv blocks into a
  ``stages``-deep ring of SMEM buffers with TMA, guarded by "loaded" / "consumed" barriers;
* QK^T and PV are ``plgpu.wgmma`` on 128-byte-swizzled SMEM tiles, the softmax runs in registers
  in the WGMMA layout, in base 2 (logits pre-multiplied by log2(e)) so each exp is one exp2;
* the kv range is clipped to the kv blocks that intersect the CTA's causal window
  (``flash_common.kv_block_bounds`` with the CTA's 2 * block_q rows), so a sliding-window layer
  costs O(T * (2 * block_q + W)), not O(T * S). Both compute warpgroups walk the same CTA-wide range
  (masking what their own rows cannot see) so that they arrive on the shared "consumed" barriers
  in lock step;
* GQA by index: query head n reads kv head n // G straight from [B, S, K, D] operands.

``flash_forward_mgpu`` returns the output and the natural-log logsumexp (sink included) [B, N, T];
``flash_attention_mgpu`` puts it and the backward kernels of ``flash_mgpu_bwd`` behind one custom
VJP. The decode / verify kernel is ``flash_mgpu_decode``; tiles, the domain check (bf16 / f16, head
dims multiples of 64, else ValueError) and the wgmma / pipeline helpers are in
``flash_mgpu_common``, which also explains how the kernels run in the Mosaic GPU interpreter.

Known risks on hardware (none of these kernels has run on a GPU yet): ``attention_mgpu`` refuses
causal masking on CUDA runtimes 12.8.0 - 12.9.0 because of a ptxas miscompilation, and these
kernels mask the same way (iota compares); the dk/dv kernel with H = 192, P = 128 holds f32 dk and
dv accumulators of 160 registers per thread and may spill.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import flash_mgpu_bwd
from pallas_kernels.flash_common import kv_block_bounds, pad_axis
from pallas_kernels.flash_mgpu_common import (
    COMPUTE_WGS,
    LN2,
    LOG2E,
    MASK_VALUE,
    MgpuBlockSizes,
    check_inputs,
    hint,
    interpret_params,
    iota,
    layouts,
    load_vector,
    matmul_acc,
    matmul_nt,
    mgpu_block_sizes,
    stream_kv,
)

__all__ = ["flash_attention_mgpu", "flash_forward_mgpu"]

# --------------------------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------------------------


def _kernel(
    q_ref,  # [B, Tp, N, H] GMEM
    k_ref,  # [B, Sp, K, H] GMEM
    v_ref,  # [B, Sp, K, P] GMEM
    sink_ref,  # [N, bq] f32 GMEM: the head's sink logit * log2(e), repeated per row
    o_ref,  # [B, Tp, N, P] GMEM
    lse_ref,  # [B, N, Tp] f32 GMEM
    scoped,
    *,
    q_len,
    kv_len,
    causal,
    window,
    scale,
    has_sinks,
    groups,
    bs: MgpuBlockSizes,
    interpret,
):
    (q_smem2, o_smem2, k_smem, v_smem, rows_smem2), barriers = scoped
    q_bars, sink_bars, k_bars, v_bars, k_free, v_free, schedule = barriers

    bq, bk, stages = bs.block_q, bs.block_kv, bs.stages
    b, n, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    # Every warpgroup derives the same kv block range from the CTA's 2 * bq rows.
    lo, hi = kv_block_bounds(
        tile,
        block_q=COMPUTE_WGS * bq,
        block_kv=bk,
        q_len=q_len,
        kv_len=kv_len,
        causal=causal,
        window=window,
    )
    n_steps = hi - lo + 1  # >= 1: the tile's first row is a real query and sees itself

    def schedule_sync():
        if bs.schedule_barrier:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, o_smem, rows_smem = q_smem2.at[wg], o_smem2.at[wg], rows_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * bq) + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), n], q_smem, q_bars.at[wg])
        plgpu.copy_gmem_to_smem(sink_ref.at[n], rows_smem, sink_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])
        plgpu.barrier_wait(sink_bars.at[wg])
        acc_layout, row_layout = (None, None) if interpret else layouts()

        m = load_vector(rows_smem, interpret)  # [bq] running max (base 2), starts at the sink
        # Denominator: exp2(sink - m) = 1 for the sink column, 0 without sinks.
        l = hint(jnp.full((bq,), 1.0 if has_sinks else 0.0, jnp.float32), row_layout, interpret)
        acc = hint(jnp.zeros((bq, o_smem.shape[-1]), jnp.float32), acc_layout, interpret)
        # Default positions: queries are the last q_len of kv_len keys.
        q_pos = kv_len - q_len + row0 + iota((bq, bk), 0, interpret)  # [bq, bk]
        col = iota((bq, bk), 1, interpret)  # [bq, bk]
        logit_scale = scale * LOG2E

        if bs.schedule_barrier:
            pl.when(wg == 1)(schedule_sync)

        def step(i, carry):
            acc, m, l = carry
            slot = lax.rem(i, jnp.asarray(stages, i.dtype))
            plgpu.barrier_wait(k_bars.at[slot])
            s = matmul_nt(q_smem, k_smem.at[slot], interpret)  # [bq, bk] f32
            schedule_sync()
            plgpu.barrier_arrive(k_free.at[slot])
            kv_pos = (lo + i) * bk + col  # [bq, bk]
            delta = q_pos - kv_pos
            s = jnp.where(kv_pos < kv_len, s * logit_scale, MASK_VALUE)  # padded keys
            if causal:
                s = jnp.where(delta >= 0, s, MASK_VALUE)
            if window is not None:
                s = jnp.where(delta < window, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))  # [bq]
            alpha = jnp.exp2(m - m_new)  # [bq]
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))  # [bq, bk]
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if bs.schedule_barrier:
                plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may wgmma
            plgpu.barrier_wait(v_bars.at[slot])
            if bs.schedule_barrier:
                plgpu.barrier_wait(schedule)
            acc = matmul_acc(acc, p.astype(dtype), v_smem.at[slot], interpret)  # [bq, P]
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc, m, l = lax.fori_loop(0, n_steps, step, (acc, m, l))
        if bs.schedule_barrier:
            pl.when(wg == 0)(schedule_sync)

        # l >= 1 for every row: the sink, or the row's largest visible term exp2(0).
        o_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        rows_smem[...] = m * LN2 + jnp.log(l)  # natural-log lse, sink included
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(row0, bq), n])
        plgpu.copy_smem_to_gmem(rows_smem, lse_ref.at[b, n, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        stream_kv((k_ref, v_ref), (k_smem, v_smem), (k_bars, v_bars), (k_free, v_free), b=b, n=n,
                  groups=groups, lo=lo, bk=bk, n_steps=n_steps, stages=stages)  # fmt: skip


def flash_forward_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array | None = None,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: MgpuBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Forward flash attention on Hopper through Mosaic GPU (default positions), without a VJP.

    Args:
      q: [B, T, N, H] queries, bf16 or f16, H a multiple of 64.
      k: [B, S, K, H] keys (N a multiple of K), same dtype.
      v: [B, S, K, P] values, P a multiple of 64, same dtype.
      sinks: optional [N] sink logits.
      sliding_window: visible keys per query counting itself, or None for global attention.
      causal: mask keys after the query.
      scale: logit scale, default H ** -0.5.
      block_sizes: tiles, default ``MgpuBlockSizes()``.
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling for sm90.

    Returns:
      o [B, T, N, P] in q's dtype and lse [B, N, T] f32 (natural log, sink term included).
    """
    bs = mgpu_block_sizes(block_sizes)
    check_inputs(q, k, v)

    b, t, n, h = q.shape
    s, kv_heads, p_dim = k.shape[1], k.shape[2], v.shape[3]
    scale = float(h**-0.5 if scale is None else scale)
    bq, bk = bs.block_q, bs.block_kv
    qp = pad_axis(q, 1, COMPUTE_WGS * bq)  # [B, Tp, N, H]
    kp = pad_axis(k, 1, bk)  # [B, Sp, K, H]
    vp = pad_axis(v, 1, bk)  # [B, Sp, K, P]
    tp = qp.shape[1]
    if sinks is None:
        sink_rows = jnp.full((n, bq), MASK_VALUE, jnp.float32)
    else:
        sink_rows = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None] * LOG2E, (n, bq))

    # 128-byte swizzle of (8, 64) tiles: the operand layout wgmma reads without bank conflicts.
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, bq, h), q.dtype, transforms=tiled),  # q
        plgpu.SMEM((COMPUTE_WGS, bq, p_dim), q.dtype, transforms=tiled),  # o
        plgpu.SMEM((bs.stages, bk, h), q.dtype, transforms=tiled),  # k ring
        plgpu.SMEM((bs.stages, bk, p_dim), q.dtype, transforms=tiled),  # v ring
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # sink rows in, lse rows out
    )
    barriers = (
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q loaded
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # sink rows loaded
        plgpu.Barrier(num_barriers=bs.stages),  # k slot loaded
        plgpu.Barrier(num_barriers=bs.stages),  # v slot loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=bs.stages),  # k slot free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=bs.stages),  # v slot free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # compute warpgroup ping-pong
    )
    body = functools.partial(
        _kernel,
        q_len=t,
        kv_len=s,
        causal=causal,
        window=sliding_window,
        scale=scale,
        has_sinks=sinks is not None,
        groups=n // kv_heads,
        bs=bs,
        interpret=interpret,
    )

    def entry(q_ref, k_ref, v_ref, sink_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *refs: body(q_ref, k_ref, v_ref, sink_ref, o_ref, lse_ref, (refs[:5], refs[5:])),
            *scratch,
            *barriers,
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((b, tp, n, p_dim), q.dtype),
            # Sequence minor, so each warpgroup's rows are one contiguous 1-D TMA store.
            jax.ShapeDtypeStruct((b, n, tp), jnp.float32),
        ),
        grid=(n, tp // (COMPUTE_WGS * bq), b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(qp, kp, vp, sink_rows)
    return o[:, :t], lse[:, :, :t]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static arguments of ``flash_attention_mgpu``: the nondiff argument of its custom VJP."""

    window: int | None
    causal: bool
    scale: float
    has_sinks: bool
    block_sizes: MgpuBlockSizes
    interpret: bool

    def kwargs(self) -> dict:
        return dict(
            sliding_window=self.window,
            causal=self.causal,
            scale=self.scale,
            block_sizes=self.block_sizes,
            interpret=self.interpret,
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, sinks, cfg: _Config):
    return _flash_fwd(q, k, v, sinks, cfg)[0]


def _flash_fwd(q, k, v, sinks, cfg: _Config):
    out, lse = flash_forward_mgpu(q, k, v, sinks if cfg.has_sinks else None, **cfg.kwargs())
    return out, (q, k, v, sinks, out, lse)  # lse: [B, N, T]


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, sinks, out, lse = res
    dq, dk, dv, dsinks = flash_mgpu_bwd.flash_backward_mgpu(
        q, k, v, sinks if cfg.has_sinks else None, out, lse, do, **cfg.kwargs()
    )
    return dq, dk, dv, jnp.zeros_like(sinks) if dsinks is None else dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array | None = None,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: MgpuBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Prefill / training flash attention on Hopper (default positions), differentiable.

    Args:
      q: [B, T, N, H] queries, bf16 or f16, H a multiple of 64.
      k: [B, S, K, H] keys (N a multiple of K), same dtype.
      v: [B, S, K, P] values, P a multiple of 64, same dtype.
      sinks: optional [N] sink logits.
      sliding_window: visible keys per query counting itself, or None for global attention.
      causal: mask keys after the query.
      scale: logit scale, default H ** -0.5.
      block_sizes: tiles, default ``MgpuBlockSizes()``.
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling for sm90.

    Returns:
      [B, T, N, P] in q's dtype; differentiable in q, k, v and sinks (forward of
      ``flash_forward_mgpu``, backward of ``flash_mgpu_bwd``).

    Raises:
      ValueError: for inputs outside the kernels' domain (``flash_mgpu_common.check_inputs``) or
        block sizes that are not ``MgpuBlockSizes``.
    """
    check_inputs(q, k, v)
    cfg = _Config(
        window=sliding_window,
        causal=causal,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        has_sinks=sinks is not None,
        block_sizes=mgpu_block_sizes(block_sizes),
        interpret=interpret,
    )
    if sinks is None:
        # A stand-in so the custom VJP has a fixed signature; its cotangent is dropped.
        sinks = jnp.zeros((q.shape[2],), jnp.float32)
    return _flash(q, k, v, sinks, cfg)
