"""KV caches whose slots carry absolute positions.

Global layers keep a linear cache (slot = position, ``max_length`` slots). Sliding-window layers
and MTP layers keep a ring of ``sliding_window + max_new_per_step`` slots (slot = position mod
size): a decoding step writes at most ``max_new_per_step`` consecutive positions, so its writes
only evict keys that no query of the step, or of a later one, still sees, and memory stays
constant in context length. Attention masks by the stored positions (negative = empty), so
rolling tokens back is just invalidating their positions (``truncate``). docs/decoding.md sizes
the rings for speculative decoding.
"""

import jax
import jax.numpy as jnp
from flax import struct

from mimo_jax import axes as ax


@struct.dataclass
class KVCache:
    """One layer's cache.

    Attributes:
      k: [B, S, K, H] keys (RoPE applied).
      v: [B, S, K, P] values (value scale applied).
      pos: int32 [B, S] absolute position held by each slot, -1 when empty.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @property
    def size(self) -> int:
        return self.pos.shape[-1]

    def constrained(self) -> "KVCache":
        """The cache in the layout of the active rule preset (batch and kv heads sharded)."""
        kv = (ax.BATCH, None, ax.KV_HEADS, None)
        return KVCache(
            ax.constrain(self.k, kv),
            ax.constrain(self.v, kv),
            ax.constrain(self.pos, (ax.BATCH, None)),
        )

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, v_head_dim: int, dtype):
        return cls(
            k=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, size, kv_heads, v_head_dim), dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
        )

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
        """Writes new entries at slot ``position mod size`` (linear caches: size > position).

        Args:
          k: [B, T, K, H] new keys.
          v: [B, T, K, P] new values.
          positions: int [B, T] their positions; negative entries are not written.

        Returns:
          The updated cache.
        """
        b = jnp.arange(k.shape[0])[:, None]  # [B, 1]
        # Invalid tokens go to an out-of-range slot, which scatter drops.
        slot = jnp.where(positions >= 0, positions % self.size, self.size)  # [B, T]
        return KVCache(
            k=self.k.at[b, slot].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[b, slot].set(v.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[b, slot].set(positions.astype(jnp.int32), mode="drop"),
        )

    def fill(
        self, k: jax.Array, v: jax.Array, lengths: jax.Array, offset: int | jax.Array = 0
    ) -> "KVCache":
        """Fills an empty cache from a right-padded prompt, keeping the last ``size`` entries.

        Args:
          k: [B, T, K, H] keys; entry i holds position i + offset.
          v: [B, T, K, P].
          lengths: int [B] valid entries per row (the rest is padding).
          offset: position of entry 0, int or int [B] per row (MTP depth k's entries start at
            position k + 1, or later when the prefill runs it on the prompt's end only).

        Returns:
          The cache; slot s holds the latest valid position p with p mod size == s.
        """
        t = k.shape[1]
        s = jnp.arange(self.size)[None]  # [1, S]
        offset = jnp.reshape(offset, (-1, 1))  # [B or 1, 1]
        last = lengths[:, None] - 1 + offset  # [B, 1] latest valid position
        p = last - jnp.mod(last - s, self.size)  # [B, S] latest position that maps to slot s
        idx = p - offset
        valid = (idx >= 0) & (idx < jnp.minimum(lengths[:, None], t))
        src = jnp.clip(idx, 0, t - 1)
        take = lambda x: jnp.take_along_axis(x, src[:, :, None, None], axis=1)  # noqa: E731
        return KVCache(k=take(k), v=take(v), pos=jnp.where(valid, p, -1).astype(jnp.int32))

    def truncate(self, lengths: jax.Array) -> "KVCache":
        """Invalidates every slot at or past ``lengths`` (rolls tokens back).

        Args:
          lengths: int [B] positions to keep per row (those below it).

        Returns:
          The cache; a stacked cache (pos [R, B, S], one per scanned repeat) is cut in every
          repeat.
        """
        keep = self.pos < lengths[:, None]  # [..., B, S]
        return self.replace(pos=jnp.where(keep, self.pos, -1))
