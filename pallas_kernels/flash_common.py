"""Shared pieces of the Pallas TPU flash kernels (``flash``, ``flash_bwd``, ``flash_decode``): tile
sizes, which blocks a tile can see, the masking rule, the online-softmax block step, the static
configuration of a call, and the [B, heads, L, D] kernel layout. The Mosaic GPU kernels
(``flash_mgpu*``) use the block bounds, ``pad_axis`` and ``forward_only`` from here too.

Nothing here builds a ``pallas_call``; keeping the block math in one module means the grids, the
index maps, the kernels' block ranges and the tests all use the same bounds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite stand-in for -inf: masked logits must give exp(MASK - m) == 0 without (-inf) - (-inf) NaNs
# in rows whose first visited block is fully masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas TPU flash kernels (128 by default: TPU lanes).

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
    def uniform(cls, size: int) -> BlockSizes:
        """All tiles ``size`` (tests use 16 so that windows span several blocks)."""
        return cls(size, size, size, size, size)


# --------------------------------------------------------------------------------------------
# Which blocks a tile can see. Shared by the grid builders, the index maps, the kernels' block
# ranges and the tests, so the "only window blocks" property is checked on the code that runs.
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
    """fp32 operands get full-precision matmuls (a TPU would otherwise multiply them in bf16
    passes); 16-bit operands the backend default."""
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


# --------------------------------------------------------------------------------------------
# One call's static configuration, and the kernel layout.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static (hashable) description of one prefill / training flash call: the nondiff argument
    of ``flash``'s custom VJP, read by the forward and the backward kernels.

    Attributes:
      q_len: T before padding.
      kv_len: S before padding.
      causal: mask keys after the query.
      window: sliding window, or None for global attention.
      scale: logit scale.
      has_sinks: whether the sink operand is real (else a zero stand-in whose gradient is dropped).
      block_sizes: the tiles.
      interpret: run the kernels in the Pallas interpreter instead of compiling for Mosaic TPU.
    """

    q_len: int
    kv_len: int
    causal: bool
    window: int | None
    scale: float
    has_sinks: bool
    block_sizes: BlockSizes
    interpret: bool

    def fwd_bounds_kwargs(self) -> dict:
        """``kv_block_bounds`` keyword arguments of the forward and dq kernels' tiles."""
        bs = self.block_sizes
        return dict(block_q=bs.block_q, block_kv=bs.block_kv, **self._rule())

    def dkdv_bounds_kwargs(self) -> dict:
        """``q_block_bounds`` keyword arguments of the dk/dv kernel's tiles."""
        bs = self.block_sizes
        return dict(block_q=bs.block_q_dkv, block_kv=bs.block_kv_dkv, **self._rule())

    def _rule(self) -> dict:
        return dict(q_len=self.q_len, kv_len=self.kv_len, causal=self.causal, window=self.window)


def compiler_params(interpret: bool, semantics: tuple[str, ...]):
    """Mosaic TPU compiler parameters, None in interpret mode.

    Args:
      interpret: whether the kernel is interpreted.
      semantics: per grid axis, "parallel" or "arbitrary" (sequential, carries scratch).

    Returns:
      ``pltpu.CompilerParams`` or None.
    """
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def scratch(shape):
    """An f32 scratch buffer of the grid schedule (VMEM on TPU, plain buffers when interpreted)."""
    return pltpu.VMEM(shape, jnp.float32)


def pad_axis(x, axis, multiple):
    """Zero-pads ``axis`` of ``x`` up to a multiple of ``multiple``."""
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def to_kernel_layout(x, seq_block):
    """[B, L, heads, D] -> [B, heads, Lp, D], the sequence zero-padded to a block multiple."""
    return pad_axis(jnp.swapaxes(x, 1, 2), 2, seq_block)


def from_kernel_layout(x, length):
    """[B, heads, Lp, D] -> [B, length, heads, D]."""
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def prepare(q, k, v, cfg: FlashConfig):
    """Kernel-layout operands of the forward and the backward.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, P].
      cfg: the call's configuration.

    Returns:
      q [B, N, Tp, H], k [B, K, Sp, H], v [B, K, Sp, P]: T padded so that both q tilings (forward
      / dq and dk/dv) divide it, S likewise for both kv tilings.
    """
    bs = cfg.block_sizes
    q_mult = np.lcm(bs.block_q, bs.block_q_dkv)
    kv_mult = np.lcm(bs.block_kv, bs.block_kv_dkv)
    return to_kernel_layout(q, q_mult), to_kernel_layout(k, kv_mult), to_kernel_layout(v, kv_mult)


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
