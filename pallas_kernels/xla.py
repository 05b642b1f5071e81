"""Pure-JAX attention: banded sliding-window attention with sinks, GQA and H != P.

``attention_xla`` has the semantics of ``reference.attention_reference`` but is meant to be used:

* Sliding-window prefill (window set, causal, default positions) runs **banded**: queries are cut
  into blocks of ``bq`` rows and each block attends only to the ``L = n_c * bq`` keys that end at
  its last row, where ``n_c = 1 + ceil((W - 1) / bq)`` chunks cover the ``bq + W - 1`` keys the
  block can see. The per-block key slices are built from static slices of a chunked, padded kv (a
  reshape, no gather), so there is no [T, S] mask or score matrix: time and memory are O(T * W).
* Global attention (no window) is a dense masked einsum: O(T * S), which is what global layers
  cost anyway.
* With explicit ``q_positions`` / ``kv_positions`` (decode or speculative verify against a KV
  cache whose slots carry absolute positions, possibly a ring buffer) it is dense over the small
  cache with ``reference.visibility_mask``.

All paths share one softmax: logits and probabilities in fp32, sink logits as an extra unscaled
column with no value vector, masked entries set to a large finite negative (not -inf) and zeroed
after the exponential so fully masked rows produce 0 and finite gradients. Matmul inputs stay in
the caller's dtype with fp32 accumulation; GQA is handled by viewing q as [B, T, K, G, H] so kv
heads are never repeated. Everything is plain JAX, differentiable by autodiff (including sinks).
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.reference import visibility_mask

__all__ = ["attention_xla", "default_block_q"]

# Large finite stand-in for -inf: exp(_NEG - m) underflows to 0 for any realistic row max m, and
# unlike -inf it never yields NaN through (-inf) - (-inf) or in the backward of jnp.where.
_NEG = -1e30

# Query block rows for the banded path. 128 matches MiMo's window (W = 129 -> L = 256 = bq + W - 1
# exactly) and keeps each block's matmuls large enough to be efficient.
_MAX_BLOCK_Q = 128
_MIN_BLOCK_Q = 32


def default_block_q(t: int, window: int) -> int:
    """Query block size for the banded path.

    Cost per query is about ``n_c * bq = bq * (1 + ceil((W - 1) / bq))`` keys, minimal near
    ``bq ~ W - 1``; the block is capped at 128 (enough for efficient matmuls) and floored at 32 to
    bound per-block overhead. The block is then shrunk to split ``t`` into equal blocks, so at most
    ``nb - 1`` padded query rows are computed.

    Args:
      t: number of queries T.
      window: sliding window W.

    Returns:
      Block size bq with ``1 <= bq <= max(t, 1)``.
    """
    target = min(_MAX_BLOCK_Q, max(_MIN_BLOCK_Q, -(-(window - 1) // 8) * 8))
    nb = max(1, -(-t // target))
    return max(1, -(-t // nb))


def _softmax_weights(
    logits: jax.Array, mask: jax.Array | None, sink: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax weights over the last axis, with an optional sink column.

    Args:
      logits: fp32 [..., Tq, L] scaled logits.
      mask: bool, broadcastable to ``logits``; True where the key is visible. None: all visible.
      sink: fp32, broadcastable to [..., Tq, 1]; the per-head sink logit. None: no sink.

    Returns:
      ``(p, inv_denom)``: fp32 [..., Tq, L] weights with masked entries exactly 0, and fp32
      [..., Tq, 1] reciprocal of the softmax denominator (sink included); ``p * inv_denom`` are the
      probabilities over real keys. A row with no visible key and no sink has ``p == 0``, so its
      output is 0 like the reference.
    """
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG)
    m = jnp.max(logits, axis=-1, keepdims=True)  # [..., Tq, 1]
    if sink is not None:
        m = jnp.maximum(m, sink)
    # Softmax is invariant to the shift, so its exact gradient ignores m; stopping it also avoids
    # routing gradient through max's tie-breaking.
    m = lax.stop_gradient(m)
    p = jnp.exp(logits - m)
    if mask is not None:
        # A fully masked row has m == _NEG and exp(0) == 1 in every column: zero them explicitly.
        p = jnp.where(mask, p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [..., Tq, 1]
    if sink is not None:
        denom = denom + jnp.exp(sink - m)
    # Double-where: the unselected branch is a constant, so neither value nor gradient is 1 / 0.
    safe = jnp.where(denom > 0, denom, 1.0)
    return p, 1.0 / safe


def _sink_logits(sinks: jax.Array | None, kv_heads: int, groups: int) -> jax.Array | None:
    """Sink logits as fp32 [K, G, 1, 1], ready to broadcast against [..., K, G, Tq, 1]."""
    if sinks is None:
        return None
    return sinks.astype(jnp.float32).reshape(kv_heads, groups, 1, 1)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None,
    mask: jax.Array | None,
    scale: float,
) -> jax.Array:
    """Dense attention over all S keys with an explicit mask.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys.
      v: [B, S, K, P] values.
      sinks: optional [N] sink logits.
      mask: bool broadcastable to [B, K, G, T, S], or None for all keys visible.
      scale: logit scale.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads, p_dim = k.shape[2], v.shape[3]
    g = n // kv_heads
    q5 = q.reshape(b, t, kv_heads, g, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", q5, k, preferred_element_type=jnp.float32)
    logits = logits * scale  # [B, K, G, T, S]
    p, inv = _softmax_weights(logits, mask, _sink_logits(sinks, kv_heads, g))
    o = jnp.einsum(
        "bkgts,bskp->bkgtp", p.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # [B, K, G, T, P]
    o = (o * inv).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, P]
    return o.reshape(b, t, n, p_dim).astype(q.dtype)


def _band_keys(x: jax.Array, *, offset: int, nb: int, bq: int, n_c: int) -> jax.Array:
    """Per-query-block key slices ``[B, nb, n_c * bq, K, D]`` built from static slices.

    Block i covers query rows ``[i * bq, (i + 1) * bq)`` at absolute positions ``offset + row``;
    its slice is the ``n_c * bq`` keys ending at the block's last query position. Positions before
    0 (and after S, only reached by padded query rows) are zero padding, masked by the caller.

    Args:
      x: [B, S, K, D] keys or values.
      offset: S - T, the absolute position of query row 0.
      nb: number of query blocks.
      bq: query block size; also the chunk size of the key axis.
      n_c: chunks per block slice.

    Returns:
      [B, nb, n_c * bq, K, D].
    """
    b, s, kv_heads, d = x.shape
    t_pad = nb * bq
    # Left padding so that every block end (offset + (i + 1) * bq) falls on a chunk boundary and
    # block 0 has n_c - 1 chunks before it; right padding covers the padded query rows.
    need = max(0, (n_c - 1) * bq - offset)
    pad_l = need + (-offset - need) % bq
    pad_r = t_pad - (s - offset)
    xp = jnp.pad(x, ((0, 0), (pad_l, pad_r), (0, 0), (0, 0)))  # [B, S', K, D]
    c0 = (offset + pad_l) // bq + 1 - n_c  # first chunk of block 0
    # Keys before the first block's window (chunked prefill with S >> T) are never read.
    chunks = xp[:, c0 * bq : (c0 + nb + n_c - 1) * bq]
    chunks = chunks.reshape(b, nb + n_c - 1, bq, kv_heads, d)  # [B, nb + n_c - 1, bq, K, D]
    # Block i reads chunks i .. i + n_c - 1: n_c shifted static slices instead of a gather.
    return jnp.concatenate([chunks[:, c : c + nb] for c in range(n_c)], axis=2)


def _banded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None,
    sliding_window: int,
    scale: float,
    block_q: int | None = None,
) -> jax.Array:
    """Causal sliding-window attention where queries are the last T of S keys, in O(T * W).

    Args:
      q: [B, T, N, H] queries at absolute positions S - T .. S - 1.
      k: [B, S, K, H] keys at positions 0 .. S - 1.
      v: [B, S, K, P] values.
      sinks: optional [N] sink logits.
      sliding_window: W, visible keys per query counting itself.
      scale: logit scale.
      block_q: query block size; default ``default_block_q(T, W)``.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kv_heads, p_dim = k.shape[1], k.shape[2], v.shape[3]
    g = n // kv_heads
    offset = s - t
    bq = block_q or default_block_q(t, sliding_window)
    nb = -(-t // bq)
    t_pad = nb * bq
    n_c = 1 + -(-(sliding_window - 1) // bq)
    span = n_c * bq  # L: keys per block, >= bq + W - 1

    qb = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    qb = qb.reshape(b, nb, bq, kv_heads, g, h)  # [B, nb, bq, K, G, H]
    kb = _band_keys(k, offset=offset, nb=nb, bq=bq, n_c=n_c)  # [B, nb, L, K, H]
    vb = _band_keys(v, offset=offset, nb=nb, bq=bq, n_c=n_c)  # [B, nb, L, K, P]

    # Row r of block i sits at offset + i*bq + r and column l at offset + (i+1)*bq - L + l, so
    # delta = r - l + L - bq is the same for every block: the band is one [bq, L] pattern, and
    # only the "before position 0" check depends on the block.
    rows = jnp.arange(bq)[:, None]
    cols = jnp.arange(span)[None, :]
    delta = rows - cols + (span - bq)  # [bq, L]
    band = (delta >= 0) & (delta < sliding_window)
    key_pos = offset + (jnp.arange(nb)[:, None] + 1) * bq - span + cols  # [nb, L]
    mask = band[None] & (key_pos >= 0)[:, None, :]  # [nb, bq, L]
    mask = mask[None, :, None, None]  # [1, nb, 1, 1, bq, L]

    logits = jnp.einsum("bnqkgh,bnlkh->bnkgql", qb, kb, preferred_element_type=jnp.float32)
    logits = logits * scale  # [B, nb, K, G, bq, L]
    p, inv = _softmax_weights(logits, mask, _sink_logits(sinks, kv_heads, g))
    o = jnp.einsum(
        "bnkgql,bnlkp->bnkgqp", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
    )  # [B, nb, K, G, bq, P]
    o = (o * inv).transpose(0, 1, 4, 2, 3, 5)  # [B, nb, bq, K, G, P]
    return o.reshape(b, t_pad, n, p_dim)[:, :t].astype(q.dtype)


def attention_xla(
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
    """Multi-head attention with GQA, optional sliding window and sink logits, in pure JAX.

    Same semantics as ``reference.attention_reference``. Causal sliding-window attention with
    default positions runs banded in O(T * W); everything else is dense over S.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys; N must be a multiple of K (query head n uses kv head n // (N // K)).
      v: [B, S, K, P] values.
      sinks: optional [N] per-head sink logits.
      sliding_window: visible keys per query including itself, or None for global attention.
      causal: mask keys after the query position.
      scale: logit scale; defaults to H ** -0.5.
      q_positions: optional int [B, T]; defaults to S - T + arange(T) (queries are the last T keys).
      kv_positions: optional int [B, S]; defaults to arange(S); negative marks an empty slot.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    t, h = q.shape[1], q.shape[3]
    s = k.shape[1]
    if scale is None:
        scale = h**-0.5
    if q_positions is not None:
        # Decode / verify against a cache: S is small and slots may be unsorted (ring buffer).
        mask = visibility_mask(
            q_positions, kv_positions, causal=causal, sliding_window=sliding_window
        )  # [B, T, S]
        return dense_attention(q, k, v, sinks=sinks, mask=mask[:, None, None], scale=scale)
    if sliding_window is not None and sliding_window >= s:
        # |q_pos - k_pos| <= S - 1 < W with default positions: the window masks nothing.
        sliding_window = None
    if sliding_window is not None and causal:
        return _banded_attention(q, k, v, sinks=sinks, sliding_window=sliding_window, scale=scale)
    mask = None
    if causal or sliding_window is not None:
        delta = (s - t + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]  # [T, S]
        mask = jnp.ones((t, s), dtype=bool)
        if causal:
            mask &= delta >= 0
        if sliding_window is not None:
            mask &= delta < sliding_window
        mask = mask[None, None, None]  # [1, 1, 1, T, S]
    return dense_attention(q, k, v, sinks=sinks, mask=mask, scale=scale)
