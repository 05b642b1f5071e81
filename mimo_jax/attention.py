"""Attention for MiMo-V2-Flash: global or sliding-window, sink logits, value scale, GQA.

Per layer type (the MiMo-V2-Flash technical report, section 2.2; docs/model.md):
  * global ("full_attention"): ``num_kv_heads`` kv heads, RoPE base ``rope_theta``, no sink.
  * sliding window: ``swa_num_kv_heads`` kv heads, RoPE base ``swa_rope_theta``, window of
    ``sliding_window`` keys (the query plus the previous ``sliding_window - 1`` tokens), and a
    learnable per-head sink logit.
Both rotate only the first ``rotary_dim`` (64 of 192) dims of q and k, scale v by
``attention_value_scale`` (not folded into the softmax scale, which stays H ** -0.5), and run
the attention math through ``pallas_kernels.attention``.

Packed rows (several examples per row, ``segment_ids`` 1, 2, ... per example and 0 on padding)
run through ``segment_attention`` instead: the same causal, window and sink rules, plus query i
seeing key j only within its own segment, so a packed example computes what it would alone in a
row. It is dense over the row (the kernels have no segment mask), and training-only.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from mimo_jax import axes as ax
from mimo_jax.cache import KVCache
from mimo_jax.config import SLIDING, ModelConfig
from mimo_jax.layers import Linear, apply_rope
from pallas_kernels.reference import visibility_mask
from pallas_kernels.xla import dense_attention


def segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    sinks: jax.Array | None,
    sliding_window: int | None,
    scale: float,
) -> jax.Array:
    """Causal self-attention restricted to segments: dense, with GQA, window and sink logits.

    Query i sees key j when ``segment_ids[i] == segment_ids[j]`` and ``0 <= i - j`` (and
    ``i - j < sliding_window``), i and j being indices in the row as in the unpacked path;
    within an example whose positions restart at 0 that is its position difference. The sink
    column is per query as without packing. Every query sees itself, so no row is empty.

    Args:
      q: [B, T, N, H] queries.
      k: [B, T, K, H] keys of the same tokens.
      v: [B, T, K, P] values.
      segment_ids: int [B, T], equal within one example (padding is one more segment).
      sinks: optional fp32 [N] sink logits (an extra unscaled column with no value).
      sliding_window: visible keys per query counting itself, or None.
      scale: logit scale.

    Returns:
      [B, T, N, P] in q's dtype.
    """
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = visibility_mask(idx, idx, causal=True, sliding_window=sliding_window)  # [B, T, S]
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return dense_attention(q, k, v, sinks=sinks, mask=mask[:, None, None], scale=scale)


class Attention(nnx.Module):
    """Self-attention block (projections + kernel), one layer type per instance."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        """Creates the projections (and the sink logits on sliding-window layers).

        Args:
          cfg: model config.
          layer_type: "full_attention" or "sliding_attention".
          rngs: parameter RNG.
        """
        self.cfg = cfg
        self.is_sliding = layer_type == SLIDING
        self.num_kv_heads = cfg.swa_num_kv_heads if self.is_sliding else cfg.num_kv_heads
        self.theta = cfg.swa_rope_theta if self.is_sliding else cfg.rope_theta
        self.window = cfg.sliding_window if self.is_sliding else None
        n, k, h, p, d = (
            cfg.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            cfg.v_head_dim,
            cfg.embed_dim,
        )
        kw = dict(
            std=cfg.initializer_range,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.q_proj = Linear(d, (n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), **kw)
        self.k_proj = Linear(d, (k, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), **kw)
        self.v_proj = Linear(d, (k, p), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), **kw)
        self.o_proj = Linear((n, p), d, (ax.HEADS, ax.HEAD_DIM, ax.EMBED), **kw)
        has_sink = cfg.swa_attention_sink if self.is_sliding else cfg.full_attention_sink
        if has_sink:
            init = jax.nn.initializers.normal(cfg.initializer_range)
            self.sinks = nnx.Param(
                init(rngs.params(), (n,), jnp.dtype(cfg.param_dtype)),
                out_sharding=(ax.HEADS,),
                eager_sharding=False,
            )
        else:
            self.sinks = None

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects and rotates.

        Args:
          x: [B, T, D] normalised hidden states.
          positions: int [B, T] absolute positions.

        Returns:
          q [B, T, N, H], k [B, T, K, H], v [B, T, K, P] (v already scaled).
        """
        rd = self.cfg.rotary_dim
        q = apply_rope(self.q_proj(x), positions, theta=self.theta, rotary_dim=rd)  # [B, T, N, H]
        k = apply_rope(self.k_proj(x), positions, theta=self.theta, rotary_dim=rd)  # [B, T, K, H]
        v = self.v_proj(x) * jnp.asarray(self.cfg.attention_value_scale, x.dtype)  # [B, T, K, P]
        return q, k, v

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Attention over (k, v) and the output projection.

        Args:
          q: [B, T, N, H].
          k: [B, S, K, H] (the new keys, or a KV cache).
          v: [B, S, K, P].
          q_positions: optional int [B, T] (needed when k/v is a cache).
          kv_positions: optional int [B, S] slot positions, negative for empty slots.
          segment_ids: optional int [B, T] (k, v of the same tokens, no cache): attention stays
            within a segment (``segment_attention``).

        Returns:
          [B, T, D].
        """
        sinks = None if self.sinks is None else self.sinks[...].astype(jnp.float32)
        scale = self.cfg.head_dim**-0.5
        if segment_ids is not None:
            o = segment_attention(
                q, k, v, segment_ids, sinks=sinks, sliding_window=self.window, scale=scale
            )  # [B, T, N, P]
            return self.o_proj(o)
        o = pallas_kernels.attention(
            q,
            k,
            v,
            sinks=sinks,
            sliding_window=self.window,
            causal=True,
            scale=scale,
            q_positions=q_positions,
            kv_positions=kv_positions,
            implementation=self.cfg.attention_impl,
        )  # [B, T, N, P]
        return self.o_proj(o)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        lengths: jax.Array | None = None,
        offset: int | jax.Array = 0,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Self-attention, with three uses of the cache.

        * ``cache is None``: causal attention over the sequence itself (training, no cache).
        * ``lengths`` given (prefill): attention over the right-padded prompt itself, and the
          cache is filled with its keys (the last ``cache.size`` valid ones per row).
        * otherwise (decode / verify): the new keys are written into the cache first, then the
          queries attend to every cache slot their positions allow.

        Args:
          x: [B, T, D] normalised hidden states.
          positions: int [B, T] absolute positions (consecutive within a row).
          cache: this layer's KVCache.
          lengths: int [B] valid prompt tokens per row (prefill only).
          offset: prefill only: position of entry 0 is ``offset`` (MTP depths), int or int [B].
          segment_ids: optional int [B, T] for packed rows (no cache, ``attention_impl="xla"``):
            each token attends only within its segment.

        Returns:
          ([B, T, D], the updated cache or None).

        Raises:
          ValueError: ``segment_ids`` with a cache, or with an attention_impl other than "xla".
        """
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids is for training forwards; got it with a KV cache")
            if self.cfg.attention_impl != "xla":
                raise ValueError(
                    f"ModelConfig.attention_impl={self.cfg.attention_impl!r}: segment_ids "
                    "(packed rows) needs attention_impl='xla'; the Pallas kernels have no "
                    "segment mask"
                )
        q, k, v = self.qkv(x, positions)
        if cache is None:
            return self.attend(q, k, v, segment_ids=segment_ids), None
        if lengths is not None:
            return self.attend(q, k, v), cache.fill(k, v, lengths, offset).constrained()
        cache = cache.write(k, v, positions).constrained()
        out = self.attend(q, cache.k, cache.v, q_positions=positions, kv_positions=cache.pos)
        return out, cache

    def init_cache(self, batch: int, max_length: int, max_new_per_step: int) -> KVCache:
        """An empty cache: a ring of window + max_new_per_step slots, or linear to max_length."""
        size = (
            max_length if self.window is None else min(max_length, self.window + max_new_per_step)
        )
        return KVCache.empty(
            batch,
            size,
            self.num_kv_heads,
            self.cfg.head_dim,
            self.cfg.v_head_dim,
            jnp.dtype(self.cfg.dtype),
        )
