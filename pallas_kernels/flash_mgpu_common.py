"""Pieces shared by the Mosaic GPU (Hopper, sm90) kernels ``flash_mgpu`` (forward),
``flash_mgpu_bwd`` (dq, dk/dv) and ``flash_mgpu_decode`` (decode / verify): their tiles
(``MgpuBlockSizes``), their domain check (``check_inputs``: bf16 / f16, head dims multiples of 64),
the wgmma and layout helpers, and the TMA pipeline of the memory warpgroup.

Interpretation. Under ``interpret=True`` the kernels run in the Mosaic GPU interpreter
(``InterpretGPUParams``), which simulates the warpgroups as threads, the SMEM buffers, TMA copies
and barriers, and checks that every barrier phase is observed. The interpreter of jax 0.10 has no
``layout_cast``, ``plgpu.load``, layout-annotated iota, ``run_state`` nor wgmma with a transposed or
register operand, so ``hint`` / ``iota`` / ``load_vector`` / ``matmul_nt`` / ``matmul_acc`` replace
just those operations by plain ``jnp`` on the same SMEM refs when interpreting. Everything else
(block bounds, pipelines, barriers, masking, sinks, GQA, lse, stores) is the code that runs
compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_common import NT_DIMS

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Masked logit in the base-2 domain. Finite so that rows whose first blocks are fully masked get
# exp2(MASK - MASK) = 1 instead of NaN; those junk terms are scaled by exp2(MASK - m) = 0 as soon
# as the row sees a real key (every real query sees at least itself).
MASK_VALUE = -1e30
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
    """Tiles of the Mosaic GPU kernels.

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
    """The tiles of a Mosaic GPU call: ``MgpuBlockSizes`` as given, the defaults for None.

    Raises:
      ValueError: for another type (e.g. the Pallas TPU kernels' ``flash_common.BlockSizes``,
        whose 8-row tiles wgmma cannot use).
    """
    if block_sizes is None:
        return MgpuBlockSizes()
    if not isinstance(block_sizes, MgpuBlockSizes):
        raise ValueError(
            "the Mosaic GPU kernels take block_sizes=flash_mgpu_common.MgpuBlockSizes(...), got "
            f"{block_sizes!r}"
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
    return plgpu.layout_cast(x, layout)


def layouts():
    """(accumulator layout, one-value-per-row layout) of a wgmma result."""
    return plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)


def iota(shape, dim, interpret):
    """int32 iota along ``dim`` of a 2-D tile, in the WGMMA accumulator layout."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
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
