"""Attention kernels for MiMo-V2-Flash: sliding window + sink bias, one front door.

``attention(...)`` is the only attention entry point of the model. It checks the operands and then
dispatches once, here, by ``implementation``, ``kernel``, the backend and whether positions are
given:

* ``implementation="xla"``: ``xla.attention_xla`` (pure JAX, differentiable, any backend).
* ``implementation="pallas"``, ``kernel="tpu"``: ``flash.flash_attention`` (Pallas TPU flash
  forward + backward), or with positions ``flash_decode.decode_attention``.
* ``implementation="pallas"``, ``kernel="mgpu"``: ``flash_mgpu.flash_attention_mgpu`` (Mosaic GPU
  forward + backward), or with positions ``flash_mgpu_decode.decode_attention_mgpu``.

``kernel`` defaults to "mgpu" (Mosaic GPU, Hopper) on GPU backends and "tpu" (Pallas TPU, Mosaic
TPU when compiled) elsewhere. The decode kernels are forward-only. ``reference.attention_reference``
is the fp32 specification every path is tested against. docs/attention_kernels.md describes the
kernels and their constraints.
"""

import os
from typing import Literal

import jax

from pallas_kernels import flash, flash_decode, flash_mgpu, flash_mgpu_decode, xla
from pallas_kernels.flash_common import BlockSizes
from pallas_kernels.flash_mgpu_common import MgpuBlockSizes
from pallas_kernels.reference import attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "KERNELS",
    "attention",
    "attention_reference",
    "default_interpret",
    "default_kernel",
]

IMPLEMENTATIONS = ("xla", "pallas")
KERNELS = ("tpu", "mgpu")
INTERPRET_ENV = "MIMO_PALLAS_INTERPRET"


def default_kernel() -> Literal["tpu", "mgpu"]:
    """The Pallas kernel family of this backend: "mgpu" on GPU, "tpu" elsewhere (CPU interprets)."""
    return "mgpu" if jax.default_backend() in ("gpu", "cuda") else "tpu"


def default_interpret() -> bool:
    """Whether Pallas kernels are interpreted when ``attention`` is not told.

    ``MIMO_PALLAS_INTERPRET=1`` / ``0`` forces interpretation on / off (e.g. ``0`` runs the kernel
    tests compiled on an accelerator, see ``bench/gpu_check.sh``); unset, kernels are interpreted
    on CPU only. This is the one place the package reads the environment.

    Raises:
      ValueError: for a value other than 1/0, true/false, yes/no, on/off.
    """
    env = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env:
        raise ValueError(f"{INTERPRET_ENV}={env!r}: use 1 (interpret) or 0 (compile)")
    return jax.default_backend() == "cpu"


def _check_inputs(q, k, v, sinks, sliding_window, q_positions, kv_positions):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [B, T, N, H], k [B, S, K, H], v [B, S, K, P]; got q{q.shape}, "
            f"k{k.shape}, v{v.shape}"
        )
    b, _, n, h = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: q{q.shape}, k{k.shape}, v{v.shape}")
    if k.shape[3] != h:
        raise ValueError(f"q head dim {h} != k head dim {k.shape[3]} (q{q.shape}, k{k.shape})")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"k{k.shape} and v{v.shape} disagree on S or the number of kv heads")
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
    if sinks is not None and sinks.shape != (n,):
        raise ValueError(f"sinks must have shape [N]=({n},), got {sinks.shape}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("pass both q_positions and kv_positions, or neither")
    if q_positions is not None and (
        q_positions.shape != q.shape[:2] or kv_positions.shape != k.shape[:2]
    ):
        raise ValueError(
            f"q_positions must be [B, T]={q.shape[:2]} and kv_positions [B, S]={k.shape[:2]}; got "
            f"{q_positions.shape} and {kv_positions.shape}"
        )


def attention(
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
    implementation: Literal["xla", "pallas"] = "xla",
    kernel: Literal["tpu", "mgpu"] | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | MgpuBlockSizes | None = None,
) -> jax.Array:
    """Multi-head attention with GQA, optional sliding window and optional per-head sink logits.

    Key j is visible to query i when ``0 <= pos_q[i] - pos_k[j] < sliding_window`` (causal) and
    ``pos_k[j] >= 0``; see ``pallas_kernels.reference`` for the exact math.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys, N a multiple of K (query head n reads kv head n // (N // K)).
      v: [B, S, K, P] values (P may differ from H).
      sinks: optional [N] sink logits (an extra unscaled softmax column per head).
      sliding_window: visible keys per query counting itself, or None for global attention.
      causal: mask keys after the query.
      scale: logit scale, default H ** -0.5.
      q_positions: optional int [B, T] absolute query positions (default: the last T of arange(S)).
      kv_positions: optional int [B, S] absolute key positions, negative for empty cache slots.
        With positions, "pallas" runs a forward-only decode kernel.
      implementation: "xla" (pure JAX) or "pallas" (flash kernels).
      kernel: "pallas" only: "tpu" (Pallas TPU kernels) or "mgpu" (Mosaic GPU kernels, Hopper:
        bf16/f16 operands, H and P multiples of 64, else ValueError); default ``default_kernel()``.
      interpret: "pallas" only: run the kernel in its interpreter (CPU) instead of compiling it;
        default ``default_interpret()`` (the ``MIMO_PALLAS_INTERPRET`` override, else on CPU).
      block_sizes: "pallas" only: tiles, ``flash_common.BlockSizes`` for "tpu",
        ``flash_mgpu_common.MgpuBlockSizes`` for "mgpu"; default that class's defaults.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    _check_inputs(q, k, v, sinks, sliding_window, q_positions, kv_positions)
    rule = dict(sinks=sinks, sliding_window=sliding_window, causal=causal, scale=scale)
    if implementation == "xla":
        pallas_only = dict(kernel=kernel, interpret=interpret, block_sizes=block_sizes)
        given = [name for name, value in pallas_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to implementation='pallas'")
        return xla.attention_xla(
            q, k, v, **rule, q_positions=q_positions, kv_positions=kv_positions
        )
    if implementation != "pallas":
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    kernel = default_kernel() if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if interpret is None:
        interpret = default_interpret()
    tuning = dict(block_sizes=block_sizes, interpret=interpret)
    if kernel == "mgpu":
        if q_positions is None:
            return flash_mgpu.flash_attention_mgpu(q, k, v, **rule, **tuning)
        return flash_mgpu_decode.decode_attention_mgpu(
            q, k, v, q_positions, kv_positions, **rule, **tuning
        )
    if q_positions is None:
        return flash.flash_attention(q, k, v, **rule, **tuning)
    return flash_decode.decode_attention(q, k, v, q_positions, kv_positions, **rule, **tuning)
