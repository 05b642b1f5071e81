"""Attention kernels for MiMo-V2-Flash: sliding window + sink bias, one front door.

``attention(..., implementation="xla" | "pallas")`` is the only attention entry point of the model.
``reference.attention_reference`` is the fp32 specification both implementations are tested against.
"""

from typing import Literal

import jax

from pallas_kernels import xla
from pallas_kernels.reference import attention_reference

__all__ = ["attention", "attention_reference", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("xla", "pallas")


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
      implementation: "xla" (pure JAX) or "pallas" (flash kernel).

    Returns:
      [B, T, N, P] in q's dtype.
    """
    _check_inputs(q, k, v, sinks, sliding_window, q_positions, kv_positions)
    kwargs = dict(
        sinks=sinks,
        sliding_window=sliding_window,
        causal=causal,
        scale=scale,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    if implementation == "xla":
        return xla.attention_xla(q, k, v, **kwargs)
    if implementation == "pallas":
        from pallas_kernels import flash  # noqa: PLC0415  (kernel module imports Pallas lazily)

        return flash.attention_pallas(q, k, v, **kwargs)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
