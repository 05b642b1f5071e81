"""fp32 reference attention: the spec every other implementation is tested against.

Sliding-window + sink attention as in MiMo-V2-Flash (and gpt-oss):

    logits_ij = scale * q_i . k_j                 (masked to -inf where j is not visible from i)
    p_ij      = exp(logits_ij - m_i) / (exp(s_h - m_i) + sum_j' exp(logits_ij' - m_i))
    o_i       = sum_j p_ij v_j

The sink logit ``s_h`` is an extra softmax column per query head: unscaled, never masked, with no
value vector, so the probabilities over real keys sum to less than one.

Visibility is defined on absolute positions: key j is visible to query i when
``0 <= pos_q[i] - pos_k[j]`` (causal) and ``pos_q[i] - pos_k[j] < sliding_window`` (transformers'
convention: ``sliding_window = 129`` means the query plus the 128 tokens before it). Keys with a
negative position are empty cache slots and never visible.

This materialises the full [T, S] score matrix: it is a specification, not a fast path.
``attention_weights`` returns the probabilities p (the notebooks plot them).
"""

import jax
import jax.numpy as jnp


def visibility_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """Which keys each query may attend to.

    Args:
      q_positions: int [B, T] absolute positions of the queries.
      kv_positions: int [B, S] absolute positions of the keys; negative marks an empty slot.
      causal: whether a query may only see keys at or before its own position.
      sliding_window: number of visible keys counting the query itself, or None for unlimited.

    Returns:
      bool [B, T, S], True where the key is visible.
    """
    delta = q_positions[:, :, None] - kv_positions[:, None, :]  # [B, T, S]
    mask = kv_positions[:, None, :] >= 0
    if causal:
        mask &= delta >= 0
    if sliding_window is not None:
        mask &= delta < sliding_window
    return mask


def attention_reference(
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
) -> jax.Array:
    """Multi-head attention with optional sliding window and sink logits, computed in fp32.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys; N must be a multiple of K (query head n uses kv head n // (N // K)).
      v: [B, S, K, P] values.
      sinks: optional [N] per-head sink logits.
      sliding_window: visible keys per query including itself, or None for global attention.
      causal: mask keys after the query position.
      scale: logit scale; defaults to H ** -0.5.
      q_positions: optional int [B, T]; defaults to S - T + arange(T) (queries are the last T keys).
      kv_positions: optional int [B, S]; defaults to arange(S).

    Returns:
      [B, T, N, P] in q's dtype.
    """
    b, t, n, _ = q.shape
    kv_heads, g = k.shape[2], n // k.shape[2]
    p = attention_weights(
        q, k, sinks=sinks, sliding_window=sliding_window, causal=causal, scale=scale,
        q_positions=q_positions, kv_positions=kv_positions,
    )  # fmt: skip
    p = p.reshape(b, kv_heads, g, t, -1)  # [B, K, G, T, S]
    o = jnp.einsum("bkgts,bskp->btkgp", p, v.astype(jnp.float32))  # [B, T, K, G, P]
    return o.reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    sinks: jax.Array | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """The softmax probabilities of ``attention_reference``, over the real keys, in fp32.

    With sinks, each row sums to less than one: ``1 - sum`` is the weight the sink column took,
    which has no value vector (the notebooks plot this). Arguments as in ``attention_reference``.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys; N must be a multiple of K.
      sinks: optional [N] per-head sink logits.
      sliding_window: visible keys per query including itself, or None for global attention.
      causal: mask keys after the query position.
      scale: logit scale; defaults to H ** -0.5.
      q_positions: optional int [B, T]; defaults to S - T + arange(T).
      kv_positions: optional int [B, S]; defaults to arange(S).

    Returns:
      fp32 [B, N, T, S]; zero where a key is not visible (and for rows that see nothing).
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if scale is None:
        scale = h**-0.5
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    qf = q.astype(jnp.float32).reshape(b, t, kv_heads, g, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale  # [B, K, G, T, S]
    mask = visibility_mask(q_positions, kv_positions, causal=causal, sliding_window=sliding_window)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, g, 1, 1)
        sink = jnp.broadcast_to(sink, (b, kv_heads, g, t, 1))
        logits = jnp.concatenate([logits, sink], axis=-1)  # [B, K, G, T, S + 1]
    # A row with no visible key and no sink would be all -inf; give it zero output instead of NaN.
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    if sinks is not None:
        p = p[..., :-1]  # the sink column has no value vector
    return p.reshape(b, n, t, s)  # K, G are contiguous: head n = k * G + g
