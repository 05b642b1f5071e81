"""Pallas flash attention for MiMo-V2-Flash: causal sliding window, per-head sinks, GQA, H != P.

FlashAttention-2 (Dao, 2023) with two changes for sink attention: the running max of each row is
initialised to its head's sink logit and the running denominator to exp(sink - sink) = 1, so the
sink is an extra softmax column that is never masked and has no value vector.

The kernel only ever visits kv blocks that intersect the causal window of a query block:
``kv_block_bounds`` gives the first and last such block, and the same helper sizes the grid
(``num_kv_steps``) and bounds the in-kernel loops, so a sliding-window layer costs
O(T * (bq + W)) instead of O(T * S). Query head n reads kv head n // G straight from the kv
arrays through the BlockSpec index map; repeated kv heads are never materialised.

Two schedules share the same block math (``_online_softmax_step``):

* ``"grid"`` (TPU Mosaic, CPU interpret): grid (B, N, q blocks, kv steps), the kv axis sequential
  ("arbitrary"), running max / denominator / accumulator in scratch. The kv BlockSpec index map
  returns the window's blocks, clamped so that steps past the window re-use the last block (no
  new DMA) and are skipped with ``pl.when``.
* ``"loop"`` (GPU through the Triton lowering, CPU interpret): grid (B, N, q blocks), and each
  program loops over its window's kv blocks with ``lax.fori_loop``, slicing them from the whole
  per-head kv sequence (the Triton lowering has no scratch carried across grid steps). Triton needs
  power-of-two tiles, so head dims are zero-padded to the next power of two in this mode.

Interpret mode is chosen automatically on CPU; ``MIMO_PALLAS_INTERPRET=0/1`` forces it off/on,
``MIMO_PALLAS_MODE=grid/loop`` forces a schedule.

Backend status: both schedules are tested on CPU in interpret mode, and both lower (jax.export to
"tpu" / "cuda" on a CPU host) without error; neither has been compiled or run on real hardware.
There is no Mosaic GPU variant yet: Mosaic GPU has no lowering for ``dot_general`` on register
values, so the kernel bodies would have to be rewritten around ``plgpu.wgmma`` on swizzled SMEM
refs (as ``jax.experimental.pallas.ops.gpu.attention_mgpu`` does), with each compute warpgroup's
kv loop clipped to ``kv_block_bounds`` and the sink folded into the initial running max.
The backward kernels live in ``flash_bwd.py`` and the KV-cache decode kernel in
``flash_decode.py``. The fp32 specification is ``reference.attention_reference``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = [
    "BlockSizes",
    "attention_pallas",
    "flash_attention",
    "kv_block_bounds",
    "num_kv_steps",
    "q_block_bounds",
    "num_q_steps",
    "resolve_interpret",
    "resolve_mode",
]

# Finite stand-in for -inf: masked logits must give exp(MASK - m) == 0 without (-inf) - (-inf) NaNs
# in rows whose first visited block is fully masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b

Mode = Literal["grid", "loop"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the flash kernels.

    Attributes:
      block_q: query rows per forward / dq tile.
      block_kv: keys per forward / dq tile.
      block_q_dkv: query rows per tile of the dk/dv kernel.
      block_kv_dkv: keys per tile of the dk/dv kernel (its output tile).
      block_kv_decode: cache slots per tile of the decode kernel.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dkv: int = 128
    block_kv_dkv: int = 128
    block_kv_decode: int = 128

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"{name}={value!r} must be a positive multiple of 8 (sublanes)")

    @classmethod
    def get_default(cls, backend: str | None = None) -> BlockSizes:
        """128 everywhere (TPU lanes); smaller tiles on GPU, where the loop schedule keeps fp32
        accumulators of up to [tile, 256] (H = 192 padded) in registers."""
        if (backend or jax.default_backend()) == "gpu":
            return cls(block_q=64, block_kv=64, block_q_dkv=64, block_kv_dkv=32, block_kv_decode=64)
        return cls()

    @classmethod
    def uniform(cls, size: int) -> BlockSizes:
        """All tiles ``size`` (tests use 16 so that windows span several blocks)."""
        return cls(size, size, size, size, size)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one flash call; the nondiff argument of the custom VJP."""

    q_len: int  # T before padding
    kv_len: int  # S before padding
    causal: bool
    window: int | None
    scale: float
    has_sinks: bool
    block_sizes: BlockSizes
    interpret: bool
    mode: Mode


# --------------------------------------------------------------------------------------------
# Which blocks a tile can see. Shared by the grid builders, the index maps, the in-kernel loops
# and the tests, so the "only window blocks" property is checked on the code that runs.
# --------------------------------------------------------------------------------------------


def div(a, b: int):
    """``a // b`` for non-negative ``a``: truncating division, which lowers everywhere (Mosaic's
    floor division goes through ``sign``, which needs a TPU to query at lowering time)."""
    if isinstance(a, (int, np.integer, np.ndarray)):
        return a // b
    return lax.div(a, jnp.asarray(b, a.dtype))


def kv_block_bounds(qi, *, block_q, block_kv, q_len, kv_len, causal, window, xp=jnp):
    """First and last (inclusive) kv block that some query of q block ``qi`` can see.

    Queries take the default positions ``kv_len - q_len + row``, keys ``col``. A query at p sees
    keys in [p - window + 1, p] (causal) or [p - window + 1, kv_len) (not causal).

    Args:
      qi: q block index (traced int32 scalar, Python int or numpy array).
      block_q, block_kv: tile sizes.
      q_len, kv_len: unpadded T and S.
      causal, window: the visibility rule (window None = global).
      xp: ``jnp`` inside kernels and index maps, ``np`` for static grid sizes.

    Returns:
      (lo, hi) block indices; the block range is empty when hi < lo. lo is always a valid index.
    """
    offset = kv_len - q_len
    first_pos = offset + qi * block_q
    last_pos = offset + xp.minimum(qi * block_q + block_q - 1, q_len - 1)
    lo_key = xp.maximum(first_pos - window + 1, 0) if window is not None else 0 * qi
    hi_key = xp.minimum(last_pos, kv_len - 1) if causal else 0 * qi + kv_len - 1
    lo = xp.minimum(div(lo_key, block_kv), (kv_len - 1) // block_kv)
    hi = div(xp.maximum(hi_key, -1) + block_kv, block_kv) - 1  # floor((hi_key + 1) / bk) - 1
    return lo, hi


def q_block_bounds(ki, *, block_q, block_kv, q_len, kv_len, causal, window, xp=jnp):
    """First and last (inclusive) q block with some query that sees a key of kv block ``ki``.

    Args and Returns: as ``kv_block_bounds`` with the roles of q and kv swapped.
    """
    offset = kv_len - q_len
    first_key = ki * block_kv
    last_key = xp.minimum(ki * block_kv + block_kv - 1, kv_len - 1)
    lo_row = xp.maximum(first_key - offset, 0) if causal else 0 * ki
    hi_row = (
        xp.minimum(last_key + window - 1 - offset, q_len - 1)
        if window is not None
        else 0 * ki + q_len - 1
    )
    lo = xp.minimum(div(lo_row, block_q), (q_len - 1) // block_q)
    hi = div(xp.maximum(hi_row, -1) + block_q, block_q) - 1
    return lo, hi


def num_kv_steps(*, block_q, block_kv, q_len, kv_len, causal, window) -> int:
    """Static grid extent of the kv axis: the most kv blocks any q block visits (at least 1)."""
    qi = np.arange(pl.cdiv(q_len, block_q))
    lo, hi = kv_block_bounds(
        qi,
        block_q=block_q,
        block_kv=block_kv,
        q_len=q_len,
        kv_len=kv_len,
        causal=causal,
        window=window,
        xp=np,
    )
    return max(1, int(np.max(hi - lo + 1)))


def num_q_steps(*, block_q, block_kv, q_len, kv_len, causal, window) -> int:
    """Static grid extent of the q axis of the dk/dv kernel (per query head of the group)."""
    ki = np.arange(pl.cdiv(kv_len, block_kv))
    lo, hi = q_block_bounds(
        ki,
        block_q=block_q,
        block_kv=block_kv,
        q_len=q_len,
        kv_len=kv_len,
        causal=causal,
        window=window,
        xp=np,
    )
    return max(1, int(np.max(hi - lo + 1)))


def precision(x):
    """fp32 operands get full-precision matmuls (Triton would otherwise use TF32); bf16 default."""
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def visible(q_pos, kv_pos, *, causal, window, kv_len=None):
    """The ``reference.visibility_mask`` rule on broadcastable position tiles.

    Args:
      q_pos: int [bq, 1] absolute query positions.
      kv_pos: int [1, bk] (or [bq, bk]) absolute key positions; negative = empty slot.
      causal, window: the visibility rule.
      kv_len: keys at positions >= kv_len are padding (prefill layout), None to skip.

    Returns:
      bool [bq, bk].
    """
    delta = q_pos - kv_pos
    mask = kv_pos >= 0
    if kv_len is not None:
        mask &= kv_pos < kv_len
    if causal:
        mask &= delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


def _online_softmax_step(q, k, v, mask, m_prev, l_prev, acc_prev, *, scale):
    """One kv block of FlashAttention-2's forward (Algorithm 1, lines 8-10).

    Args:
      q: [bq, H] queries; k: [bk, H]; v: [bk, P]; mask: bool [bq, bk].
      m_prev, l_prev: f32 [bq, 1] running max and denominator; acc_prev: f32 [bq, P].
      scale: logit scale.

    Returns:
      (m, l, acc) after the block.
    """
    s = lax.dot_general(q, k, NT_DIMS, precision=precision(q), preferred_element_type=jnp.float32)
    s = jnp.where(mask, s * scale, MASK_VALUE)  # [bq, bk]
    m = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
    alpha = jnp.exp(m_prev - m)
    # Zero masked entries explicitly: a row with no visible key yet has m == MASK_VALUE and
    # exp(s - m) == 1 there.
    p = jnp.where(mask, jnp.exp(s - m), 0.0)  # [bq, bk]
    l = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision(v), preferred_element_type=jnp.float32)
    acc = alpha * acc_prev + pv
    return m, l, acc


def _init_stats(sink, block_q):
    """Running (max, denominator) before any key: the sink column, or an empty row."""
    if sink is None:
        return (
            jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
        )
    # m = sink, l = exp(sink - m) = 1: the sink is the softmax's first column.
    return jnp.broadcast_to(sink, (block_q, 1)), jnp.ones((block_q, 1), jnp.float32)


def _finalize(m, l, acc):
    """Normalised output and logsumexp; rows that saw nothing (no key, no sink) give o = 0 and
    lse = +inf so that the backward's exp(s - lse) is 0 for them."""
    o = acc / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return o, lse


# --------------------------------------------------------------------------------------------
# Forward kernels.
# --------------------------------------------------------------------------------------------


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
    cfg: _Config,
):
    """Grid schedule: program (b, n, qi, j) folds the j-th window kv block of q block qi."""
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    qi, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_bounds(qi, **_fwd_bounds_kwargs(cfg))
    ki = lo + j

    @pl.when(j == 0)
    def _init():
        m, l = _init_stats(None if sinks_ref is None else sinks_ref[...], bq)
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = jnp.zeros_like(acc_scratch)

    @pl.when(ki <= hi)
    def _step():
        q_pos = cfg.kv_len - cfg.q_len + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = visible(q_pos, kv_pos, causal=cfg.causal, window=cfg.window, kv_len=cfg.kv_len)
        m, l, acc = _online_softmax_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            mask,
            m_scratch[...],
            l_scratch[...],
            acc_scratch[...],
            scale=cfg.scale,
        )
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        o, lse = _finalize(m_scratch[...], l_scratch[...], acc_scratch[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def flash_fwd_loop_kernel(
    sinks_ref,  # [1, 1] f32 or None
    q_ref,  # [bq, H]
    k_ref,  # [Sp, H]: the whole sequence of this kv head
    v_ref,  # [Sp, P]
    o_ref,  # [bq, P]
    lse_ref,  # [bq, 1] f32
    *,
    cfg: _Config,
):
    """Loop schedule: program (b, n, qi) loops over the window kv blocks of q block qi."""
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    qi = pl.program_id(2)
    lo, hi = kv_block_bounds(qi, **_fwd_bounds_kwargs(cfg))
    q = q_ref[...]
    q_pos = cfg.kv_len - cfg.q_len + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(ki, carry):
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = visible(q_pos, kv_pos, causal=cfg.causal, window=cfg.window, kv_len=cfg.kv_len)
        k = k_ref[pl.ds(ki * bk, bk), :]
        v = v_ref[pl.ds(ki * bk, bk), :]
        return _online_softmax_step(q, k, v, mask, *carry, scale=cfg.scale)

    m, l = _init_stats(None if sinks_ref is None else sinks_ref[...], bq)
    acc = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
    m, l, acc = lax.fori_loop(lo, hi + 1, body, (m, l, acc))
    o, lse = _finalize(m, l, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _fwd_bounds_kwargs(cfg: _Config) -> dict:
    return dict(
        block_q=cfg.block_sizes.block_q,
        block_kv=cfg.block_sizes.block_kv,
        q_len=cfg.q_len,
        kv_len=cfg.kv_len,
        causal=cfg.causal,
        window=cfg.window,
    )


# --------------------------------------------------------------------------------------------
# Backend plumbing shared with flash_bwd / flash_decode.
# --------------------------------------------------------------------------------------------


def resolve_interpret(interpret: bool | None = None) -> bool:
    """Interpret mode: explicit argument, else ``MIMO_PALLAS_INTERPRET``, else "on CPU"."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("MIMO_PALLAS_INTERPRET", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return jax.default_backend() == "cpu"


def resolve_mode(mode: Mode | None = None) -> Mode:
    """Schedule: explicit, else ``MIMO_PALLAS_MODE``, else "loop" on GPU and "grid" elsewhere."""
    mode = mode or os.environ.get("MIMO_PALLAS_MODE") or None
    if mode is None:
        mode = "loop" if jax.default_backend() == "gpu" else "grid"
    if mode not in ("grid", "loop"):
        raise ValueError(f"mode must be 'grid' or 'loop', got {mode!r}")
    return mode


def compiler_params(mode: Mode, interpret: bool, semantics: tuple[str, ...], head_dim: int = 128):
    """Backend compiler parameters (None in interpret mode).

    Args:
      mode: the schedule; "loop" targets the Triton GPU lowering, "grid" Mosaic TPU.
      interpret: whether the kernel is interpreted.
      semantics: per grid axis, "parallel" or "arbitrary" (sequential, carries scratch).
      head_dim: largest (padded) head dim of the kernel; wide tiles get 8 warps on GPU.

    Returns:
      a CompilerParams object or None.
    """
    if interpret:
        return None
    if mode == "loop":
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

        return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    return pltpu.CompilerParams(dimension_semantics=semantics)


def scratch(shape):
    """An f32 scratch buffer of the grid schedule (VMEM on TPU, plain buffers when interpreted)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    return pltpu.VMEM(shape, jnp.float32)


def _pad_axis(x, axis, multiple):
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def head_dim_multiple(mode: Mode, dim: int) -> int:
    """Triton tiles must be powers of two: pad head dims to the next one in loop mode."""
    if mode == "loop":
        return max(16, 1 << (dim - 1).bit_length())
    return dim


def to_kernel_layout(x, seq_block, dim_multiple):
    """[B, L, heads, D] -> [B, heads, Lp, Dp], zero-padded (seq to a block multiple)."""
    x = jnp.swapaxes(x, 1, 2)
    x = _pad_axis(x, 2, seq_block)
    return _pad_axis(x, 3, dim_multiple)


def from_kernel_layout(x, length, dim):
    """[B, heads, Lp, Dp] -> [B, length, heads, dim]."""
    return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


def sinks_operand(sinks, num_heads):
    """Per-head sink logits as [N, 1, 1] f32 so each program reads a (1, 1) tile."""
    if sinks is None:
        sinks = jnp.zeros((num_heads,), jnp.float32)
    return sinks.astype(jnp.float32).reshape(num_heads, 1, 1)


# --------------------------------------------------------------------------------------------
# Forward pallas_call.
# --------------------------------------------------------------------------------------------


def _flash_forward(q, k, v, sinks, cfg: _Config):
    """Runs the forward kernel on kernel-layout operands.

    Args:
      q: [B, N, Tp, Hp]; k: [B, K, Sp, Hp]; v: [B, K, Sp, Pp] (padded to tiles).
      sinks: [N, 1, 1] f32.
      cfg: static configuration.

    Returns:
      o [B, N, Tp, Pp] in q's dtype and lse [B, N, Tp, 1] f32 (sink term included).
    """
    b, n, tp, hp = q.shape
    kv_heads, sp, pp = k.shape[1], k.shape[2], v.shape[3]
    g = n // kv_heads
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    nq = tp // bq
    bounds = functools.partial(kv_block_bounds, **_fwd_bounds_kwargs(cfg))
    out_shape = (
        jax.ShapeDtypeStruct((b, n, tp, pp), q.dtype),
        jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
    )
    sink_spec = None
    if cfg.mode == "grid":
        steps = num_kv_steps(**_fwd_bounds_kwargs(cfg))

        def kv_index(bi, ni, qi, j):
            lo, hi = bounds(qi)
            # Steps past the window repeat the last block: same index, so no new copy is issued.
            return bi, div(ni, g), jnp.minimum(lo + j, jnp.maximum(hi, lo)), 0

        grid = (b, n, nq, steps)
        sink_spec = pl.BlockSpec((None, 1, 1), lambda bi, ni, qi, j: (ni, 0, 0))
        in_specs = [
            pl.BlockSpec((None, None, bq, hp), lambda bi, ni, qi, j: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bk, hp), kv_index),
            pl.BlockSpec((None, None, bk, pp), kv_index),
        ]
        out_specs = [
            pl.BlockSpec((None, None, bq, pp), lambda bi, ni, qi, j: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi, j: (bi, ni, qi, 0)),
        ]
        scratch_shapes = [
            scratch((bq, 1)),
            scratch((bq, 1)),
            scratch((bq, pp)),
        ]
        kernel = flash_fwd_kernel
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
    else:
        grid = (b, n, nq)
        sink_spec = pl.BlockSpec((None, 1, 1), lambda bi, ni, qi: (ni, 0, 0))
        in_specs = [
            pl.BlockSpec((None, None, bq, hp), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, sp, hp), lambda bi, ni, qi: (bi, div(ni, g), 0, 0)),
            pl.BlockSpec((None, None, sp, pp), lambda bi, ni, qi: (bi, div(ni, g), 0, 0)),
        ]
        out_specs = [
            pl.BlockSpec((None, None, bq, pp), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi: (bi, ni, qi, 0)),
        ]
        scratch_shapes = []
        kernel = flash_fwd_loop_kernel
        semantics = ("parallel", "parallel", "parallel")

    operands = [q, k, v]
    if cfg.has_sinks:
        operands = [sinks, *operands]
        in_specs = [sink_spec, *in_specs]
        body = functools.partial(kernel, cfg=cfg)
    else:
        body = functools.partial(kernel, None, cfg=cfg)
    return pl.pallas_call(
        body,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch_shapes,
        compiler_params=compiler_params(cfg.mode, cfg.interpret, semantics, max(hp, pp)),
        interpret=cfg.interpret,
        name="mimo_flash_fwd",
    )(*operands)


# --------------------------------------------------------------------------------------------
# Public op: custom VJP over [B, T, N, H] operands.
# --------------------------------------------------------------------------------------------


def _prepare(q, k, v, cfg: _Config):
    """Transposes to [B, heads, L, D] and pads L to tiles and head dims for the schedule."""
    bs = cfg.block_sizes
    # Both q tilings (forward and dk/dv) must divide the padded T; same for kv.
    q_mult = np.lcm(bs.block_q, bs.block_q_dkv)
    kv_mult = np.lcm(bs.block_kv, bs.block_kv_dkv)
    hm = head_dim_multiple(cfg.mode, q.shape[-1])
    pm = head_dim_multiple(cfg.mode, v.shape[-1])
    return (
        to_kernel_layout(q, q_mult, hm),
        to_kernel_layout(k, kv_mult, hm),
        to_kernel_layout(v, kv_mult, pm),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, sinks, cfg: _Config):
    return _flash_fwd(q, k, v, sinks, cfg)[0]


def _flash_fwd(q, k, v, sinks, cfg: _Config):
    qk, kk, vk = _prepare(q, k, v, cfg)
    o, lse = _flash_forward(qk, kk, vk, sinks_operand(sinks, q.shape[2]), cfg)
    out = from_kernel_layout(o, q.shape[1], v.shape[-1])  # [B, T, N, P]
    return out, (q, k, v, sinks, out, lse)


def _flash_bwd(cfg: _Config, res, do):
    from pallas_kernels import flash_bwd  # noqa: PLC0415  (keeps the module graph acyclic)

    q, k, v, sinks, out, lse = res
    return flash_bwd.flash_backward(q, k, v, sinks, out, lse, do, cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    mode: Mode | None = None,
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
      block_sizes: tiles; default ``BlockSizes.get_default()``.
      interpret: force the Pallas interpreter on/off (default: ``resolve_interpret``).
      mode: "grid" or "loop" schedule (default: ``resolve_mode``).

    Returns:
      [B, T, N, P] in q's dtype; differentiable in q, k, v and sinks.
    """
    block_sizes = block_sizes or BlockSizes.get_default()
    mode = resolve_mode(mode)
    interpret = resolve_interpret(interpret)
    if mode == "loop" and not interpret:
        for name, size in dataclasses.asdict(block_sizes).items():
            if size & (size - 1):
                raise ValueError(f"loop (Triton) mode needs power-of-two tiles, got {name}={size}")
    cfg = _Config(
        q_len=q.shape[1],
        kv_len=k.shape[1],
        causal=causal,
        window=sliding_window,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        has_sinks=sinks is not None,
        block_sizes=block_sizes,
        interpret=interpret,
        mode=mode,
    )
    if sinks is None:
        # A stand-in so the custom VJP has a fixed signature; its cotangent is dropped.
        return _flash(q, k, v, jnp.zeros((q.shape[2],), jnp.float32), cfg)
    return _flash(q, k, v, sinks, cfg)


def attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    mode: Mode | None = None,
) -> jax.Array:
    """Front-door target for ``implementation="pallas"`` (see ``pallas_kernels.attention``).

    Without positions this is ``flash_attention`` (differentiable). With ``q_positions`` and
    ``kv_positions`` (decode / speculative verify over a KV cache, possibly a ring buffer) it runs
    the forward-only decode kernel of ``flash_decode``.

    Args:
      q, k, v, sinks, sliding_window, causal, scale: as ``pallas_kernels.attention``.
      q_positions: optional int [B, T] absolute query positions.
      kv_positions: optional int [B, S] absolute cache-slot positions, negative = empty.
      block_sizes, interpret, mode: as ``flash_attention``.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    if q_positions is not None:
        from pallas_kernels import flash_decode  # noqa: PLC0415

        return flash_decode.decode_attention(
            q,
            k,
            v,
            q_positions,
            kv_positions,
            sinks=sinks,
            sliding_window=sliding_window,
            causal=causal,
            scale=scale,
            block_sizes=block_sizes,
            interpret=interpret,
            mode=mode,
        )
    return flash_attention(
        q,
        k,
        v,
        sinks=sinks,
        sliding_window=sliding_window,
        causal=causal,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
        mode=mode,
    )
