"""KV caches whose slots carry absolute positions.

Global layers keep a linear cache (slot = position, ``max_length`` slots). Sliding-window layers
and MTP layers keep a ring of ``sliding_window + max_new_per_step`` slots (slot = position mod
size): a step writes at most ``max_new_per_step`` tokens past the accepted length, so even the
writes of rejected draft tokens only evict keys that no future query's window reaches, and memory
stays constant in context length. Attention masks by the stored positions (negative = empty), so
rolling back rejected tokens is just invalidating their positions.

``cache_bytes`` sizes these caches for a config without allocating anything.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

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

    def fill(self, k: jax.Array, v: jax.Array, lengths: jax.Array, offset: int = 0) -> "KVCache":
        """Fills an empty cache from a right-padded prompt, keeping the last ``size`` entries.

        Args:
          k: [B, T, K, H] keys; entry i holds position i + offset.
          v: [B, T, K, P].
          lengths: int [B] valid entries per row (the rest is padding).
          offset: position of entry 0 (MTP depth k's entries start at position k + 1).

        Returns:
          The cache; slot s holds the latest valid position p with p mod size == s.
        """
        t = k.shape[1]
        s = jnp.arange(self.size)[None]  # [1, S]
        last = lengths[:, None] - 1 + offset  # [B, 1] latest valid position
        p = last - jnp.mod(last - s, self.size)  # [B, S] latest position that maps to slot s
        idx = p - offset
        valid = (idx >= 0) & (idx < jnp.minimum(lengths[:, None], t))
        src = jnp.clip(idx, 0, t - 1)
        take = lambda x: jnp.take_along_axis(x, src[:, :, None, None], axis=1)  # noqa: E731
        return KVCache(k=take(k), v=take(v), pos=jnp.where(valid, p, -1).astype(jnp.int32))

    def truncate(self, lengths: jax.Array) -> "KVCache":
        """Invalidates every slot at or past ``lengths`` [B] (rolls back rejected tokens)."""
        return self.replace(pos=jnp.where(self.pos >= lengths[:, None], -1, self.pos))


def max_new_per_step(num_draft_tokens: int) -> int:
    """Most positions one decoding step writes into any cache with ``num_draft_tokens`` drafts.

    The verify writes d + 1 tokens into the decoder caches; each MTP depth rewrites 2d positions
    (see ``mimo_jax.generate``). Rings of ``sliding_window + max_new_per_step(d)`` slots then
    never lose a key that a query of the step, or of a later one, still sees.
    """
    d = num_draft_tokens
    return max(d + 1, 2 * d)


def cache_bytes(cfg, *, batch: int, max_length: int, max_new_per_step: int) -> dict:
    """Bytes of the decoding cache of ``cfg`` versus caching every layer globally.

    Shapes come from ``jax.eval_shape`` over an abstract model's ``init_cache``, so nothing is
    allocated even for the full-size config.

    Args:
      cfg: a ``ModelConfig``.
      batch: sequences.
      max_length: slots of the global layers' linear caches (prompt + generated tokens).
      max_new_per_step: most tokens one step writes (ring slack, see ``max_new_per_step``).

    Returns:
      Bytes *per sequence*: ``global``, ``swa``, ``mtp`` (k + v + slot positions of each kind of
      cache, summed over its layers), ``total`` (their sum), ``all_global`` (the same layers and
      kv heads, every one of them a linear cache over ``max_length``), ``kv_only`` and
      ``all_global_kv_only`` (the same two without the int32 slot positions), and ``ratio``
      (``all_global / total``).
    """
    from mimo_jax.model import MiMoV2Flash  # noqa: PLC0415  (model imports this module)

    model = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_length, max_new_per_step))
    sliding = [m.self_attn.is_sliding for m in model.layers]
    slot_sliding = [m.self_attn.is_sliding for m in model.scanned]
    groups = {"global": [], "swa": [], "mtp": list(shapes["mtp"])}
    for c, is_swa in zip(shapes["layers"], sliding, strict=True):
        groups["swa" if is_swa else "global"].append(c)
    for c, is_swa in zip(shapes["scanned"], slot_sliding, strict=True):
        groups["swa" if is_swa else "global"].append(c)  # stacked: leading repeats axis

    def nbytes(x, slot_axis: int, slots: int | None = None) -> int:
        """Bytes of x, or of x with ``slots`` entries along its slot axis."""
        shape = list(x.shape)
        if slots is not None:
            shape[slot_axis] = slots
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    out = {}
    total = kv = full = full_kv = 0
    for name, caches in groups.items():
        out[name] = 0
        for c in caches:  # k, v: [..., B, S, K, H]; pos: [..., B, S]
            b_kv = nbytes(c.k, -3) + nbytes(c.v, -3)
            f_kv = nbytes(c.k, -3, max_length) + nbytes(c.v, -3, max_length)
            out[name] += b_kv + nbytes(c.pos, -1)
            kv += b_kv
            full_kv += f_kv
            full += f_kv + nbytes(c.pos, -1, max_length)
        out[name] //= batch
        total += out[name]
    out.update(
        total=total,
        all_global=full // batch,
        kv_only=kv // batch,
        all_global_kv_only=full_kv // batch,
    )
    out["ratio"] = out["all_global"] / out["total"]
    return out
