"""Pallas flash attention for MiMo-V2-Flash: causal sliding window, per-head sinks, GQA, H != P.

FlashAttention-2 (Dao, 2023) with two changes for sink attention: the running max of each row is
initialised to its head's sink logit and the running denominator to exp(sink - sink) = 1, so the
sink is an extra softmax column that is never masked and has no value vector.

The kernel only ever visits kv blocks that intersect the causal window of a query block:
``kv_block_bounds`` gives the first and last such block, and the same helper sizes the grid
(``num_kv_steps``) and bounds the in-kernel loops, so a sliding-window layer costs
O(T * (bq + W)) instead of O(T * S). Query head n reads kv head n // G straight from the kv
arrays through the BlockSpec index map; repeated kv heads are never materialised.

Two schedules share the same block math (``online_softmax_step``):

* ``"grid"`` (TPU Mosaic, CPU interpret): grid (B, N, q blocks, kv steps), the kv axis sequential
  ("arbitrary"), running max / denominator / accumulator in scratch. The kv BlockSpec index map
  returns the window's blocks, clamped so that steps past the window re-use the last block (no
  new DMA) and are skipped with ``pl.when``.
* ``"loop"`` (GPU through the Triton lowering, CPU interpret): grid (B, N, q blocks), and each
  program loops over its window's kv blocks with ``lax.fori_loop``, slicing them from the whole
  per-head kv sequence (the Triton lowering has no scratch carried across grid steps). Triton needs
  power-of-two tiles, so head dims are zero-padded to the next power of two in this mode.

A third schedule, ``"mgpu"``, the default on GPU backends, runs forward, backward and decode with
the Mosaic GPU (Hopper) kernels of ``flash_mgpu.py``, ``flash_mgpu_bwd.py`` and
``flash_mgpu_decode.py`` (the Triton lowering is deprecated from JAX 0.11); inputs outside their
domain (f32, head dims not multiples of 64) raise ValueError rather than fall back to Triton.
"loop" stays available on explicit request. Block math, masking and layout helpers shared by all
kernels are in ``flash_common.py``.

Interpret mode is chosen automatically on CPU; ``MIMO_PALLAS_INTERPRET=0/1`` forces it off/on,
``MIMO_PALLAS_MODE=grid/loop/mgpu`` forces a schedule.

Backend status: "grid" and "loop" are tested on CPU in interpret mode and lower (jax.export to
"tpu" / "cuda" on a CPU host); "mgpu" (forward, backward, decode) is tested in the Mosaic GPU
interpreter and lowers to "cuda" (tests/test_attention_mgpu.py). None has been compiled or run
on real hardware yet. The pallas_call backward kernels live in ``flash_bwd.py`` and the KV-cache
decode kernel in ``flash_decode.py``. The fp32 specification is ``reference.attention_reference``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash_mgpu  # Mosaic GPU is imported lazily, when a kernel is built

# Re-exported so that ``flash.BlockSizes``, ``flash.kv_block_bounds`` etc. stay the public names.
from pallas_kernels.flash_common import (
    BlockSizes,
    Mode,
    compiler_params,
    div,
    finalize,
    from_kernel_layout,
    fwd_bounds_kwargs,
    head_dim_multiple,
    init_stats,
    kv_block_bounds,
    num_kv_steps,
    num_q_steps,
    online_softmax_step,
    online_softmax_update,
    q_block_bounds,
    resolve_interpret,
    resolve_mode,
    scratch,
    sinks_operand,
    to_kernel_layout,
    visible,
)

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


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one flash call; the nondiff argument of the custom VJP."""

    q_len: int  # T before padding
    kv_len: int  # S before padding
    causal: bool
    window: int | None
    scale: float
    has_sinks: bool
    block_sizes: BlockSizes | flash_mgpu.MgpuBlockSizes  # the latter in "mgpu" mode
    interpret: bool
    mode: Mode  # "grid" / "loop": the pallas_call kernels here; "mgpu": flash_mgpu*


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
    lo, hi = kv_block_bounds(qi, **fwd_bounds_kwargs(cfg))
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
    lo, hi = kv_block_bounds(qi, **fwd_bounds_kwargs(cfg))
    q = q_ref[...]
    q_pos = cfg.kv_len - cfg.q_len + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(ki, carry):
        kv_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = visible(q_pos, kv_pos, causal=cfg.causal, window=cfg.window, kv_len=cfg.kv_len)
        k = k_ref[pl.ds(ki * bk, bk), :]
        v = v_ref[pl.ds(ki * bk, bk), :]
        return online_softmax_step(q, k, v, mask, *carry, scale=cfg.scale)

    m, l = init_stats(None if sinks_ref is None else sinks_ref[...], bq)
    acc = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
    m, l, acc = lax.fori_loop(lo, hi + 1, body, (m, l, acc))
    o, lse = finalize(m, l, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


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
    bounds = functools.partial(kv_block_bounds, **fwd_bounds_kwargs(cfg))
    out_shape = (
        jax.ShapeDtypeStruct((b, n, tp, pp), q.dtype),
        jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
    )
    sink_spec = None
    if cfg.mode == "grid":
        steps = num_kv_steps(**fwd_bounds_kwargs(cfg))

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


def _mgpu_kwargs(cfg: _Config) -> dict:
    return dict(
        sliding_window=cfg.window,
        causal=cfg.causal,
        scale=cfg.scale,
        block_sizes=cfg.block_sizes,
        interpret=cfg.interpret,
    )


def _flash_fwd(q, k, v, sinks, cfg: _Config):
    if cfg.mode == "mgpu":
        sinks_in = sinks if cfg.has_sinks else None
        out, lse = flash_mgpu.flash_forward_mgpu(q, k, v, sinks_in, **_mgpu_kwargs(cfg))
        return out, (q, k, v, sinks, out, lse)  # lse: [B, N, T]
    qk, kk, vk = _prepare(q, k, v, cfg)
    o, lse = _flash_forward(qk, kk, vk, sinks_operand(sinks, q.shape[2]), cfg)
    out = from_kernel_layout(o, q.shape[1], v.shape[-1])  # [B, T, N, P]
    return out, (q, k, v, sinks, out, lse)


def _flash_bwd(cfg: _Config, res, do):
    from pallas_kernels import flash_bwd  # noqa: PLC0415  (keeps the module graph acyclic)

    q, k, v, sinks, out, lse = res
    if cfg.mode == "mgpu":
        from pallas_kernels import flash_mgpu_bwd  # noqa: PLC0415

        dq, dk, dv, dsinks = flash_mgpu_bwd.flash_backward_mgpu(
            q, k, v, sinks if cfg.has_sinks else None, out, lse, do, **_mgpu_kwargs(cfg)
        )
        return dq, dk, dv, jnp.zeros_like(sinks) if dsinks is None else dsinks
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
    block_sizes: BlockSizes | flash_mgpu.MgpuBlockSizes | None = None,
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
      block_sizes: tiles; ``BlockSizes`` for "grid" / "loop" (default
        ``BlockSizes.get_default()``), ``flash_mgpu.MgpuBlockSizes`` for "mgpu" (default
        ``flash_mgpu.MgpuBlockSizes()``).
      interpret: force the Pallas interpreter on/off (default: ``resolve_interpret``).
      mode: "grid", "loop" or "mgpu" schedule (default: ``resolve_mode``, "mgpu" on GPU). "mgpu"
        runs forward and backward with the Mosaic GPU kernels of ``flash_mgpu`` /
        ``flash_mgpu_bwd`` (no Triton); it needs bf16/f16 inputs and head dims that are multiples
        of 64 and raises ValueError otherwise.

    Returns:
      [B, T, N, P] in q's dtype; differentiable in q, k, v and sinks.
    """
    mode = resolve_mode(mode)
    interpret = resolve_interpret(interpret)
    if mode == "mgpu":
        block_sizes = flash_mgpu.mgpu_block_sizes(block_sizes)
        flash_mgpu.check_inputs(q, k, v)
    else:
        block_sizes = block_sizes or BlockSizes.get_default()
        if not isinstance(block_sizes, BlockSizes):
            raise ValueError(f"mode={mode!r} needs flash.BlockSizes, got {block_sizes!r}")
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
    block_sizes: BlockSizes | flash_mgpu.MgpuBlockSizes | None = None,
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
