"""Mosaic GPU (Hopper, sm90) forward kernel of the MiMo-V2-Flash flash attention, and the helpers
shared with the Mosaic GPU backward (``flash_mgpu_bwd``) and decode (``flash_mgpu_decode``) kernels.

The same math as ``flash.py`` (FlashAttention-2 with the sink folded into the running max: the row
max starts at the head's sink logit and the denominator at exp(sink - sink) = 1), written for
``jax.experimental.pallas.mosaic_gpu`` instead of the Triton lowering, in the FlashAttention-3
shape of ``jax.experimental.pallas.ops.gpu.attention_mgpu``:

* one CTA per (query head, 2 * block_q query rows, batch row), three warpgroups: two compute
  warpgroups (block_q rows each) and one memory warpgroup that streams kv blocks into a
  ``stages``-deep ring of SMEM buffers with TMA, guarded by "loaded" / "consumed" barriers;
* QK^T and PV are ``plgpu.wgmma`` on 128-byte-swizzled SMEM tiles, the softmax runs in registers
  in the WGMMA layout, in base 2 (logits pre-multiplied by log2(e)) so each exp is one exp2;
* the kv loop is clipped to the kv blocks that intersect the CTA's causal window
  (``flash_common.kv_block_bounds`` with the CTA's 2 * block_q rows), so a sliding-window layer
  costs O(T * (2 * block_q + W)), not O(T * S). Both compute warpgroups walk the same CTA-wide range
  (masking what their own rows cannot see) so that they arrive on the shared "consumed" barriers
  in lock step;
* GQA by index: query head n reads kv head n // G straight from [B, S, K, D] operands.

It returns the output and the natural-log logsumexp (sink included) [B, N, T], which the Mosaic
GPU backward of ``flash_mgpu_bwd.py`` consumes; ``flash_mgpu_decode.py`` is the decode / verify
kernel. Both reuse this module's tiles (``MgpuBlockSizes``), domain check (``check_inputs``: bf16 /
f16, head dims multiples of 64, else ValueError) and the wgmma / layout / pipeline helpers below.
``flash.flash_attention(mode="mgpu")`` and ``flash_decode.decode_attention(mode="mgpu")`` use
these kernels only (no Triton anywhere); "mgpu" is the default schedule on GPU backends.

Testing status (see tests/test_attention_mgpu.py):

* CPU: forward, backward and decode run in the Mosaic GPU interpreter (``InterpretGPUParams``),
  which simulates the warpgroups as threads, the SMEM buffers, TMA copies and barriers, and checks
  that every barrier phase is observed. The interpreter (jax 0.10) has no ``layout_cast``,
  ``plgpu.load``, layout-annotated iota, ``run_state`` nor wgmma with a transposed or register
  operand, so under ``interpret=True`` the helpers ``matmul_nt`` / ``matmul_acc`` / ``hint`` /
  ``iota`` / ``load_vector`` replace just those operations by plain ``jnp`` on the same SMEM
  refs. Everything else (block bounds, pipelines, barriers, masking, sink, GQA, lse, stores) is
  the code that runs compiled. Known interpreter limits: it recompiles each CTA's thread bodies
  (the tests cache them), and with several interpreted kernels in one XLA program it can deadlock
  on a 2-core host (the tests dispatch each kernel on its own).
* The compiled path (wgmma, layouts) of all three kernels is checked by lowering to "cuda" from
  the CPU host.
* Not yet compiled or run on an H100/H200 (no GPU was available when this was written): run
  ``bench/gpu_check.sh`` (step (a) runs these tests compiled, step (b) benchmarks "mgpu" fwd+bwd
  against XLA dense / banded and times decode).

  Known risk: ``attention_mgpu`` refuses causal masking on CUDA runtimes 12.8.0 - 12.9.0 because
  of a ptxas miscompilation; these kernels mask the same way (iota compares), so check the CUDA
  version first if compiled results are wrong. Register pressure of the dk/dv kernel with
  H = 192, P = 128 (f32 dk + dv accumulators of 160 registers per thread) may spill.

Remaining work: tuning block sizes / stages / schedule barrier on hardware; per-warpgroup kv
ranges (the CTA-wide range wastes up to one kv block per warpgroup on sliding-window layers); the
FlashAttention-3 ping-pong in the backward kernels (only the forward alternates its warpgroups).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_common import NT_DIMS, kv_block_bounds, pad_axis

__all__ = ["MgpuBlockSizes", "check_inputs", "flash_forward_mgpu", "mgpu_block_sizes"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Masked logit in the base-2 domain. Finite so that rows whose first blocks are fully masked get
# exp2(MASK - MASK) = 1 instead of NaN; those junk terms are scaled by exp2(MASK - m) = 0 as soon
# as the row sees a real key (every real query sees at least itself).
MASK_VALUE = -1e30
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
    """Tiles of the Mosaic GPU forward.

    Attributes:
      block_q: query rows per compute warpgroup of the forward and dq kernels (a CTA covers
        ``2 * block_q`` rows).
      block_kv: keys per pipeline stage of the forward and dq kernels.
      block_q_dkv: query rows per pipeline stage of the dk/dv kernel.
      block_kv_dkv: keys per compute warpgroup of the dk/dv kernel (a CTA covers
        ``2 * block_kv_dkv`` keys).
      block_kv_decode: cache slots per pipeline stage of the decode kernel.
      stages: blocks in flight (SMEM ring depth). With H = 192, P = 128, bf16 and the defaults the
        forward holds q 48 KiB + o 32 KiB + stages * 40 KiB of k/v; dq and dk/dv about as much.
      schedule_barrier: make the two compute warpgroups of the forward alternate between wgmma and
        softmax (FlashAttention-3 ping-pong), as ``attention_mgpu`` does.
    """

    block_q: int = 64
    block_kv: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_kv_decode: int = 64
    stages: int = 2
    schedule_barrier: bool = True

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_kv_decode"):
            size = getattr(self, name)
            # wgmma works on 64-row warpgroup tiles and 64-wide swizzled bf16 columns.
            if not isinstance(size, int) or size <= 0 or size % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {size!r}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


def mgpu_block_sizes(block_sizes) -> MgpuBlockSizes:
    """The tiles of an "mgpu" call: ``MgpuBlockSizes`` as given, the defaults for None.

    Raises:
      ValueError: for another type (e.g. the pallas_call kernels' ``flash_common.BlockSizes``,
        whose 8-row tiles wgmma cannot use).
    """
    if block_sizes is None:
        return MgpuBlockSizes()
    if not isinstance(block_sizes, MgpuBlockSizes):
        raise ValueError(
            f"mode='mgpu' takes block_sizes=flash_mgpu.MgpuBlockSizes(...), got {block_sizes!r}"
        )
    return block_sizes


def check_inputs(q, k, v):
    """Raises ValueError for operands outside the Mosaic GPU kernels' domain (no silent fallback).

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, P].
    """
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            "the Mosaic GPU kernels need q, k, v all bf16 or all f16 (wgmma takes 16-bit "
            f"operands); got q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}. Cast them, "
            "or use implementation='xla'."
        )
    h, p = q.shape[-1], v.shape[-1]
    if h % 64 or p % 64:
        raise ValueError(
            f"the Mosaic GPU kernels need head dims that are multiples of 64 (one 128-byte "
            f"swizzled bf16 tile); got H=q.shape[-1]={h}, P=v.shape[-1]={p}. Use "
            "implementation='xla' for other sizes."
        )


def interpret_params(interpret: bool):
    """``plgpu.kernel``'s ``interpret`` argument: the Mosaic GPU interpreter's params or None."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415

    return InterpretGPUParams()


# --------------------------------------------------------------------------------------------
# Operations that the Mosaic GPU interpreter (jax 0.10) lacks: the compiled form, and a plain-jnp
# stand-in on the same SMEM refs under interpret.
# --------------------------------------------------------------------------------------------


def hint(x, layout, interpret):
    """Pins a register value to a WGMMA layout (the lowering cannot always infer it)."""
    if interpret:
        return x
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    return plgpu.layout_cast(x, layout)


def layouts():
    """(accumulator layout, one-value-per-row layout) of a wgmma result."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    return plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)


def iota(shape, dim, interpret):
    """int32 iota along ``dim`` of a 2-D tile, in the WGMMA accumulator layout."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def load_vector(ref, interpret, axis=1):
    """A 1-D SMEM vector in registers, laid out to broadcast against a wgmma accumulator.

    Args:
      ref: [n] SMEM ref (f32 or int32).
      interpret: plain load under the interpreter.
      axis: 1: one value per accumulator row (``n`` = rows); 0: one per column.

    Returns:
      [n] value.
    """
    if interpret:
        return ref[...]
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def matmul_nt(a_smem, b_smem, interpret):
    """a @ b^T with both operands in SMEM (wgmma reads b through a transposed view).

    Args:
      a_smem: [m, d] SMEM ref; b_smem: [n, d] SMEM ref (m = 64 rows per warpgroup).

    Returns:
      f32 [m, n] in the WGMMA layout.
    """
    if interpret:
        return lax.dot_general(
            a_smem[...], b_smem[...], NT_DIMS, preferred_element_type=jnp.float32
        )
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    def compute(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(compute, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def matmul_acc(acc, a, b_smem, interpret):
    """acc + a @ b with ``a`` in registers.

    Args:
      acc: f32 [m, n]; a: [m, k] in b's dtype (WGMMA layout); b_smem: [k, n] SMEM ref.

    Returns:
      f32 [m, n].
    """
    if interpret:
        return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    def compute(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(compute)(plgpu.ACC.init(acc))


def produce(n_steps, stages, groups):
    """Memory warpgroup body: streams ``n_steps`` pipeline steps through a ``stages``-deep ring.

    Step i goes to slot i % stages. The first ``stages`` steps are issued at once; step i >= stages
    reuses its slot after the compute warpgroups have arrived on the slot's "free" barriers.

    Args:
      n_steps: traced int, number of steps (may be 0).
      stages: ring depth.
      groups: sequence of (free barrier ref [stages], issue(step, slot)): each ``issue`` starts the
        TMA copies of one step into one slot; its copies wait for that group's free barrier only.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    def first(i):
        for _, issue in groups:
            issue(i, i)

    for i in range(stages):
        pl.when(i < n_steps)(functools.partial(first, i))

    @pl.loop(0, jnp.maximum(n_steps - stages, 0))
    def _refill(i):
        slot = lax.rem(i, jnp.asarray(stages, i.dtype))
        for free, issue in groups:
            plgpu.barrier_wait(free.at[slot])  # every compute warpgroup is done with the slot
            issue(i + stages, slot)

    # Observe the last phases of the "free" barriers too, so every barrier phase has been
    # waited on by the end of the kernel (the interpreter checks this; free on hardware).
    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _drain(i):
        slot = lax.rem(i, jnp.asarray(stages, i.dtype))
        for free, _ in groups:
            plgpu.barrier_wait(free.at[slot])


def stream_kv(kv_refs, smems, bars, frees, *, b, n, groups, lo, bk, n_steps, stages):
    """Memory warpgroup of the forward and dq kernels: streams kv blocks ``lo .. lo + n_steps``
    of query head n's kv head (n // groups) through the SMEM rings with TMA.

    Args:
      kv_refs: (k_ref [B, Sp, K, H], v_ref [B, Sp, K, P]) in GMEM.
      smems: their SMEM rings [stages, bk, ...].
      bars: their "loaded" barriers [stages].
      frees: their "consumed" barriers [stages].
      b, n: batch row and query head of this CTA.
      groups: query heads per kv head (G).
      lo: first kv block; bk: kv block size.
      n_steps: traced number of kv blocks; stages: ring depth.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(n, jnp.asarray(groups, n.dtype))

    def issue(ref, smem, bar):
        def start(step, slot):
            rows = (b, pl.ds((lo + step) * bk, bk), kv_head)
            plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot], bar.at[slot])

        return start

    produce(n_steps, stages, [
        (free, issue(ref, smem, bar))
        for ref, smem, bar, free in zip(kv_refs, smems, bars, frees, strict=True)
    ])  # fmt: skip


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
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

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
    """Forward flash attention on Hopper through Mosaic GPU (default positions, as ``flash``).

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
    bs = block_sizes or MgpuBlockSizes()
    check_inputs(q, k, v)
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

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
