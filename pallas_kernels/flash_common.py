"""Shared pieces of the Pallas flash kernels (``flash``, ``flash_bwd``, ``flash_decode``,
``flash_mgpu``): tile sizes, which blocks a tile can see, the masking rule, the online-softmax
block step, backend selection and the [B, heads, L, D] kernel layout.

Nothing here builds a ``pallas_call``; keeping the block math in one module means the grids, the
index maps, the in-kernel loops and the tests all use the same bounds.
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

# Finite stand-in for -inf: masked logits must give exp(MASK - m) == 0 without (-inf) - (-inf) NaNs
# in rows whose first visited block is fully masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b

# "mgpu": the Mosaic GPU (Hopper) kernels of flash_mgpu*.py for forward, backward and decode.
Mode = Literal["grid", "loop", "mgpu"]


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


def _max_blocks(bounds, n_blocks, **kw) -> int:
    """The most blocks ``bounds`` gives any of ``n_blocks`` outer blocks (at least 1)."""
    lo, hi = bounds(np.arange(n_blocks), xp=np, **kw)
    return max(1, int(np.max(hi - lo + 1)))


def num_kv_steps(*, block_q, block_kv, q_len, kv_len, causal, window) -> int:
    """Static grid extent of the kv axis: the most kv blocks any q block visits (at least 1)."""
    kw = dict(block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len, causal=causal)
    return _max_blocks(kv_block_bounds, pl.cdiv(q_len, block_q), window=window, **kw)


def num_q_steps(*, block_q, block_kv, q_len, kv_len, causal, window) -> int:
    """Static grid extent of the q axis of the dk/dv kernel (per query head of the group)."""
    kw = dict(block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len, causal=causal)
    return _max_blocks(q_block_bounds, pl.cdiv(kv_len, block_kv), window=window, **kw)


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


def online_softmax_step(q, k, v, mask, m_prev, l_prev, acc_prev, *, scale):
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


def online_softmax_update(q_ref, k_ref, v_ref, mask, m_ref, l_ref, acc_ref, *, scale):
    """``online_softmax_step`` on scratch refs: the grid schedule's running max / sum / output."""
    m, l, acc = online_softmax_step(
        q_ref[...], k_ref[...], v_ref[...], mask, m_ref[...], l_ref[...], acc_ref[...], scale=scale
    )
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


def init_stats(sink, block_q):
    """Running (max, denominator) before any key: the sink column, or an empty row."""
    if sink is None:
        return (
            jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
        )
    # m = sink, l = exp(sink - m) = 1: the sink is the softmax's first column.
    return jnp.broadcast_to(sink, (block_q, 1)), jnp.ones((block_q, 1), jnp.float32)


def finalize(m, l, acc):
    """Normalised output and logsumexp; rows that saw nothing (no key, no sink) give o = 0 and
    lse = +inf so that the backward's exp(s - lse) is 0 for them."""
    o = acc / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return o, lse


def fwd_bounds_kwargs(cfg) -> dict:
    """``kv_block_bounds`` keyword arguments of a forward / dq config (``flash._Config``)."""
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
    """Schedule: explicit, else ``MIMO_PALLAS_MODE``, else "mgpu" on GPU and "grid" elsewhere.

    "mgpu" runs the Mosaic GPU kernels (``flash_mgpu*``, Hopper); "loop" the deprecated Triton
    lowering, kept for other GPUs and for inputs outside the Mosaic GPU kernels' domain (f32, head
    dims that are not multiples of 64), on explicit request only.
    """
    mode = mode or os.environ.get("MIMO_PALLAS_MODE") or None
    if mode is None:
        mode = "mgpu" if jax.default_backend() in ("gpu", "cuda") else "grid"
    if mode not in ("grid", "loop", "mgpu"):
        raise ValueError(f"mode must be 'grid', 'loop' or 'mgpu', got {mode!r}")
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


def pad_axis(x, axis, multiple):
    """Zero-pads ``axis`` of ``x`` up to a multiple of ``multiple``."""
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
    x = pad_axis(x, 2, seq_block)
    return pad_axis(x, 3, dim_multiple)


def from_kernel_layout(x, length, dim):
    """[B, heads, Lp, Dp] -> [B, length, heads, dim]."""
    return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


def sinks_operand(sinks, num_heads):
    """Per-head sink logits as [N, 1, 1] f32 so each program reads a (1, 1) tile."""
    if sinks is None:
        sinks = jnp.zeros((num_heads,), jnp.float32)
    return sinks.astype(jnp.float32).reshape(num_heads, 1, 1)


def forward_only(decode, kernel: str):
    """``decode(q, k, v, sinks, q_positions, kv_positions, cfg)`` behind a custom VJP whose
    backward raises: the decode kernels serve inference only, and XLA must not try to
    differentiate through a ``pallas_call``.

    Args:
      decode: the kernel wrapper; ``cfg`` (argument 6) is static.
      kernel: its name for the error message.

    Returns:
      The wrapped function.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def op(q, k, v, sinks, q_positions, kv_positions, cfg):
        return decode(q, k, v, sinks, q_positions, kv_positions, cfg)

    def fwd(q, k, v, sinks, q_positions, kv_positions, cfg):
        return decode(q, k, v, sinks, q_positions, kv_positions, cfg), None

    def bwd(cfg, res, do):
        raise NotImplementedError(
            f"The {kernel} decode kernel (q_positions / kv_positions given) is forward-only; "
            "differentiate with implementation='xla' or without explicit positions."
        )

    op.defvjp(fwd, bwd)
    return op
