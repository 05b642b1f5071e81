"""Mosaic GPU (Hopper, sm90) backward kernels of the MiMo-V2-Flash flash attention.

The math of ``flash_bwd.py`` (FlashAttention-2, Algorithm 2): probabilities are recomputed from q,
k and the forward's logsumexp, which already contains the sink term, so p = exp(s - lse) is the
sink-aware softmax. With delta = rowsum(dO * O):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

Two warp-specialised kernels in the shape of ``flash_mgpu``'s forward (two compute warpgroups,
one TMA memory warpgroup feeding a ``stages``-deep SMEM ring, every matmul a ``wgmma`` on
128-byte-swizzled tiles, softmax in base 2):

* dq: one CTA per (query head, 2 * block_q rows, batch row); streams k and v blocks of the kv
  head n // G over the CTA's causal window (``flash_common.kv_block_bounds``), as the forward.
* dk/dv: one CTA per (kv head, 2 * block_kv_dkv keys, batch row); each compute warpgroup keeps its
  block_kv_dkv rows of k and v in SMEM and f32 dk / dv accumulators in registers, and the memory
  warpgroup streams (q, dO, lse, delta) blocks of every query head of the group and every q block
  whose window reaches the CTA's keys (``flash_common.q_block_bounds``). dK and dV are summed over
  the G query heads inside the kernel, so repeated kv heads never exist in memory.

The kernels work in the transposed orientation where that keeps wgmma's operands in SMEM:
dk/dv computes S^T = K Q^T and dP^T = V dO^T ([keys, queries]), so that dV += P^T dO and
dK += dS^T Q take the register tile as wgmma's left operand.

The sink gradient needs only lse and delta (derivation in ``flash_bwd``'s docstring):
dsinks[n] = -sum_{b, i} exp(sink_n - lse_bni) * delta_bni, an O(B * N * T) XLA reduction.

Under ``interpret=True`` the kernels run in the Mosaic GPU interpreter with the same jnp
stand-ins as the forward (``flash_mgpu_common.matmul_nt`` and friends).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import flash_mgpu_common as fm
from pallas_kernels.flash_common import kv_block_bounds, pad_axis, q_block_bounds

__all__ = ["flash_backward_mgpu"]

COMPUTE_WGS = fm.COMPUTE_WGS


def _visible(q_pos, kv_pos, *, q_len, kv_len, causal, window):
    """Visibility of (query, key) position tiles; padded queries and keys are never visible.

    Args:
      q_pos, kv_pos: int32 tiles of the same shape; query row i sits at kv_len - q_len + i, so
        padded rows (i >= q_len) are exactly those at q_pos >= kv_len.
      q_len, kv_len, causal, window: the static visibility rule (``vis`` of the kernels).

    Returns:
      bool tile.
    """
    del q_len  # folded into q_pos; accepted so the kernels can pass their ``vis`` dict
    delta = q_pos - kv_pos
    mask = (kv_pos < kv_len) & (q_pos < kv_len)
    if causal:
        mask &= delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


# --------------------------------------------------------------------------------------------
# dq kernel.
# --------------------------------------------------------------------------------------------


def _dq_kernel(
    q_ref,  # [B, Tp, N, H] GMEM
    k_ref,  # [B, Sp, K, H] GMEM
    v_ref,  # [B, Sp, K, P] GMEM
    do_ref,  # [B, Tp, N, P] GMEM
    lse_ref,  # [B, N, Tp] f32 GMEM, base 2, +inf on padded rows
    delta_ref,  # [B, N, Tp] f32 GMEM
    dq_ref,  # [B, Tp, N, H] GMEM
    scoped,
    *,
    vis,
    scale,
    groups,
    bs: fm.MgpuBlockSizes,
    interpret,
):
    (q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem), barriers = scoped
    row_bars, k_bars, v_bars, k_free, v_free = barriers
    bq, bk, stages = bs.block_q, bs.block_kv, bs.stages
    b, n, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    # The forward's CTA-wide kv range: both warpgroups meet on the same "free" barriers.
    lo, hi = kv_block_bounds(tile, block_q=COMPUTE_WGS * bq, block_kv=bk, **vis)
    n_steps = jnp.maximum(hi - lo + 1, 0)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * bq) + wg * bq
        rows = pl.ds(row0, bq)
        loads = (
            (q_ref.at[b, rows, n], q_smem),
            (do_ref.at[b, rows, n], do_smem),
            (lse_ref.at[b, n, rows], lse_smem),
            (delta_ref.at[b, n, rows], delta_smem),
        )
        for i, (src, dst) in enumerate(loads):
            plgpu.copy_gmem_to_smem(src, dst, row_bars.at[i * COMPUTE_WGS + wg])
        for i in range(len(loads)):
            plgpu.barrier_wait(row_bars.at[i * COMPUTE_WGS + wg])
        acc_layout = None if interpret else fm.layouts()[0]
        lse = fm.load_vector(lse_smem, interpret)  # [bq] base 2
        delta = fm.load_vector(delta_smem, interpret)  # [bq]
        dq = fm.hint(jnp.zeros((bq, q_smem.shape[-1]), jnp.float32), acc_layout, interpret)
        q_pos = vis["kv_len"] - vis["q_len"] + row0 + fm.iota((bq, bk), 0, interpret)  # [bq, bk]
        col = fm.iota((bq, bk), 1, interpret)  # [bq, bk]

        def step(i, dq):
            slot = lax.rem(i, jnp.asarray(stages, i.dtype))
            plgpu.barrier_wait(k_bars.at[slot])
            s = fm.matmul_nt(q_smem, k_smem.at[slot], interpret)  # [bq, bk] f32
            plgpu.barrier_wait(v_bars.at[slot])
            dp = fm.matmul_nt(do_smem, v_smem.at[slot], interpret)  # [bq, bk] dO V^T
            plgpu.barrier_arrive(v_free.at[slot])
            mask = _visible(q_pos, (lo + i) * bk + col, **vis)
            p = jnp.exp2(s * (scale * fm.LOG2E) - lax.broadcast_in_dim(lse, s.shape, [0]))
            p = jnp.where(mask, p, 0.0)
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))  # [bq, bk]
            dq = fm.matmul_acc(dq, ds.astype(dtype), k_smem.at[slot], interpret)  # [bq, H]
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = lax.fori_loop(0, n_steps, step, dq)
        q_smem[...] = (dq * scale).astype(dtype)  # q is no longer needed: reuse its tile
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, n])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        fm.stream_kv((k_ref, v_ref), (k_smem, v_smem), (k_bars, v_bars), (k_free, v_free), b=b, n=n,
                  groups=groups, lo=lo, bk=bk, n_steps=n_steps, stages=stages)  # fmt: skip


# --------------------------------------------------------------------------------------------
# dk / dv kernel.
# --------------------------------------------------------------------------------------------


def _dkdv_kernel(
    q_ref,  # [B, Tp, N, H] GMEM
    k_ref,  # [B, Sp, K, H] GMEM
    v_ref,  # [B, Sp, K, P] GMEM
    do_ref,  # [B, Tp, N, P] GMEM
    lse_ref,  # [B, N, Tp] f32 GMEM, base 2
    delta_ref,  # [B, N, Tp] f32 GMEM
    dk_ref,  # [B, Sp, K, H] GMEM
    dv_ref,  # [B, Sp, K, P] GMEM
    scoped,
    *,
    vis,
    scale,
    groups,
    bs: fm.MgpuBlockSizes,
    interpret,
):
    (k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem), barriers = scoped
    kv_bars, q_bars, do_bars, lse_bars, delta_bars, free = barriers
    bq, bk, stages = bs.block_q_dkv, bs.block_kv_dkv, bs.stages
    b, kh, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    # q blocks that see some key of the CTA's 2 * bk keys; the steps walk them once per query
    # head of the group: step i is head kh * G + i // nq, q block lo + i % nq.
    lo, hi = q_block_bounds(tile, block_q=bq, block_kv=COMPUTE_WGS * bk, **vis)
    nq = jnp.maximum(hi - lo + 1, 0)
    n_steps = groups * nq
    nq_div = jnp.maximum(nq, 1)  # divisor only used when n_steps > 0

    def block_of(i):
        return kh * groups + lax.div(i, nq_div), lo + lax.rem(i, nq_div)  # (query head, q block)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * bk) + wg * bk
        rows = (b, pl.ds(row0, bk), kh)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_bars.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_bars.at[COMPUTE_WGS + wg])
        plgpu.barrier_wait(kv_bars.at[wg])
        plgpu.barrier_wait(kv_bars.at[COMPUTE_WGS + wg])
        acc_layout = None if interpret else fm.layouts()[0]
        dk = fm.hint(jnp.zeros((bk, k_smem.shape[-1]), jnp.float32), acc_layout, interpret)
        dv = fm.hint(jnp.zeros((bk, v_smem.shape[-1]), jnp.float32), acc_layout, interpret)
        kv_pos = row0 + fm.iota((bk, bq), 0, interpret)  # [bk, bq]
        col = fm.iota((bk, bq), 1, interpret)  # [bk, bq]
        q_pos0 = vis["kv_len"] - vis["q_len"]

        def step(i, carry):
            dk, dv = carry
            slot = lax.rem(i, jnp.asarray(stages, i.dtype))
            _, qi = block_of(i)
            plgpu.barrier_wait(q_bars.at[slot])
            s_t = fm.matmul_nt(k_smem, q_smem.at[slot], interpret)  # [bk, bq] K Q^T
            plgpu.barrier_wait(lse_bars.at[slot])
            lse = fm.load_vector(lse_smem.at[slot], interpret, axis=0)  # [bq] per column
            mask = _visible(q_pos0 + qi * bq + col, kv_pos, **vis)
            p_t = jnp.exp2(s_t * (scale * fm.LOG2E) - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            p_t = jnp.where(mask, p_t, 0.0)  # [bk, bq]
            plgpu.barrier_wait(do_bars.at[slot])
            dv = fm.matmul_acc(dv, p_t.astype(dtype), do_smem.at[slot], interpret)  # [bk, P]
            dp_t = fm.matmul_nt(v_smem, do_smem.at[slot], interpret)  # [bk, bq] V dO^T
            plgpu.barrier_wait(delta_bars.at[slot])
            delta = fm.load_vector(delta_smem.at[slot], interpret, axis=0)  # [bq]
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))  # [bk, bq]
            dk = fm.matmul_acc(dk, ds_t.astype(dtype), q_smem.at[slot], interpret)  # [bk, H]
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        dk, dv = lax.fori_loop(0, n_steps, step, (dk, dv))
        # k and v are no longer needed: their tiles carry dk and dv out.
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def issue(step, slot):
            head, qi = block_of(step)
            rows = pl.ds(qi * bq, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[slot], q_bars.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_smem.at[slot], lse_bars.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[slot], do_bars.at[slot])
            plgpu.copy_gmem_to_smem(
                delta_ref.at[b, head, rows], delta_smem.at[slot], delta_bars.at[slot]
            )

        # One "free" barrier per slot: a step's four buffers are released together.
        fm.produce(n_steps, stages, [(free, issue)])


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------


def _kernel_call(body, operands, out_type, scratch, barriers, grid, grid_names, interpret):
    n_scratch = len(scratch)

    def entry(*refs):
        pl.run_scoped(
            lambda *s: body(*refs, (s[:n_scratch], s[n_scratch:])),
            *scratch,
            *barriers,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=fm.interpret_params(interpret),
    )(*operands)


def flash_backward_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array | None,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: fm.MgpuBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``flash_mgpu.flash_forward_mgpu`` (default positions) on Hopper.

    Args:
      q: [B, T, N, H] queries, bf16 or f16, H a multiple of 64.
      k: [B, S, K, H] keys; v: [B, S, K, P] values, P a multiple of 64, same dtype.
      sinks: optional [N] sink logits.
      out: [B, T, N, P] forward output; lse: [B, N, T] f32 forward logsumexp (natural log, sink
        included), both as returned by ``flash_forward_mgpu``.
      do: [B, T, N, P] output cotangent.
      sliding_window, causal, scale: as the forward.
      block_sizes: tiles, default ``MgpuBlockSizes()`` (block_q / block_kv for dq,
        block_q_dkv / block_kv_dkv for dk/dv, and stages).
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling for sm90.

    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, P], dsinks [N] or None), typed like the
      inputs.
    """
    bs = fm.mgpu_block_sizes(block_sizes)
    fm.check_inputs(q, k, v)
    b, t, n, h = q.shape
    s, kv_heads, p_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = n // kv_heads
    scale = float(h**-0.5 if scale is None else scale)
    dtype = q.dtype
    vis = dict(q_len=t, kv_len=s, causal=causal, window=sliding_window)
    # dq tiles 2 * block_q rows per CTA and streams block_kv keys; dk/dv the other way round.
    t_mult = math.lcm(COMPUTE_WGS * bs.block_q, bs.block_q_dkv)
    s_mult = math.lcm(bs.block_kv, COMPUTE_WGS * bs.block_kv_dkv)
    qp, dop = pad_axis(q, 1, t_mult), pad_axis(do.astype(dtype), 1, t_mult)  # [B, Tp, N, *]
    kp, vp = pad_axis(k, 1, s_mult), pad_axis(v, 1, s_mult)  # [B, Sp, K, *]
    tp, sp = qp.shape[1], kp.shape[1]
    lse = lse.astype(jnp.float32)
    # delta_i = dO_i . O_i; padded rows get delta 0 and lse +inf (p = 0, they saw nothing).
    delta = jnp.einsum("btnp,btnp->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
    delta_p = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))  # [B, N, Tp]
    lse2 = jnp.pad(lse * fm.LOG2E, ((0, 0), (0, 0), (0, tp - t)), constant_values=jnp.inf)
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    operands = (qp, kp, vp, dop, lse2, delta_p)
    kw = dict(vis=vis, scale=scale, groups=groups, bs=bs, interpret=interpret)

    bq, bk = bs.block_q, bs.block_kv
    dq = _kernel_call(
        functools.partial(_dq_kernel, **kw),
        operands,
        jax.ShapeDtypeStruct(qp.shape, dtype),
        (
            plgpu.SMEM((COMPUTE_WGS, bq, h), dtype, transforms=tiled),  # q in, dq out
            plgpu.SMEM((COMPUTE_WGS, bq, p_dim), dtype, transforms=tiled),  # dO
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse rows
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # delta rows
            plgpu.SMEM((bs.stages, bk, h), dtype, transforms=tiled),  # k ring
            plgpu.SMEM((bs.stages, bk, p_dim), dtype, transforms=tiled),  # v ring
        ),
        (
            plgpu.Barrier(num_barriers=4 * COMPUTE_WGS),  # q, dO, lse, delta loaded, per wg
            plgpu.Barrier(num_barriers=bs.stages),  # k slot loaded
            plgpu.Barrier(num_barriers=bs.stages),  # v slot loaded
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=bs.stages),  # k slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=bs.stages),  # v slot free
        ),
        (n, tp // (COMPUTE_WGS * bq), b),
        ("heads", "q_seq", "batch"),
        interpret,
    )

    bq, bk = bs.block_q_dkv, bs.block_kv_dkv
    dk, dv = _kernel_call(
        functools.partial(_dkdv_kernel, **kw),
        operands,
        (jax.ShapeDtypeStruct(kp.shape, dtype), jax.ShapeDtypeStruct(vp.shape, dtype)),
        (
            plgpu.SMEM((COMPUTE_WGS, bk, h), dtype, transforms=tiled),  # k in, dk out
            plgpu.SMEM((COMPUTE_WGS, bk, p_dim), dtype, transforms=tiled),  # v in, dv out
            plgpu.SMEM((bs.stages, bq, h), dtype, transforms=tiled),  # q ring
            plgpu.SMEM((bs.stages, bq, p_dim), dtype, transforms=tiled),  # dO ring
            plgpu.SMEM((bs.stages, bq), jnp.float32),  # lse ring
            plgpu.SMEM((bs.stages, bq), jnp.float32),  # delta ring
        ),
        (
            plgpu.Barrier(num_barriers=2 * COMPUTE_WGS),  # k, v loaded, per wg
            plgpu.Barrier(num_barriers=bs.stages),  # q slot loaded
            plgpu.Barrier(num_barriers=bs.stages),  # dO slot loaded
            plgpu.Barrier(num_barriers=bs.stages),  # lse slot loaded
            plgpu.Barrier(num_barriers=bs.stages),  # delta slot loaded
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=bs.stages),  # slot free
        ),
        (kv_heads, sp // (COMPUTE_WGS * bk), b),
        ("heads", "kv_seq", "batch"),
        interpret,
    )
    dsinks = None
    if sinks is not None:
        # dsinks[n] = -sum_{b, i} exp(sink_n - lse_bni) * delta_bni (see flash_bwd).
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)  # [B, N, T]
        dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    return dq[:, :t], dk[:, :s], dv[:, :s], dsinks
