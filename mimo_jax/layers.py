"""Building blocks: Linear (multi-axis kernels), RMSNorm, Embedder, SwiGLU MLP, partial RoPE."""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import axes as ax


def _as_tuple(x: int | tuple[int, ...]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class Linear(nnx.Module):
    """y = x @ W without bias, where W may have several input and output axes.

    The kernel is stored ``[*in_shape, *out_shape]`` (the transpose of PyTorch's ``[out, in]``),
    so attention projections keep heads as their own axis (``[D, N, H]``) for sharding.
    """

    def __init__(
        self,
        in_shape: int | tuple[int, ...],
        out_shape: int | tuple[int, ...],
        axes: tuple[str | None, ...],
        *,
        std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        """Creates the kernel.

        Args:
          in_shape: contracted dims (the trailing dims of x).
          out_shape: produced dims.
          axes: one logical axis name per kernel dim.
          std: normal initialiser std.
          dtype: compute dtype.
          param_dtype: storage dtype.
          rngs: parameter RNG.
        """
        self.in_shape, self.out_shape = _as_tuple(in_shape), _as_tuple(out_shape)
        shape = self.in_shape + self.out_shape
        if len(axes) != len(shape):
            raise ValueError(f"Linear: {len(axes)} axis names for kernel shape {shape}")
        init = jax.nn.initializers.normal(std)
        # Sharding is applied by the rule presets in sharding.py, not at creation time.
        self.kernel = nnx.Param(
            init(rngs.params(), shape, param_dtype), out_sharding=axes, eager_sharding=False
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        k = self.kernel[...].astype(self.dtype)
        dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x.astype(self.dtype), k, (dims, ((), ())))


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps); normalised in fp32, weight applied in the input dtype.

    The weight is stored directly (initialised to ones), not as ``1 + w``.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.scale = nnx.Param(
            jnp.ones((dim,), param_dtype), out_sharding=(ax.NORM,), eager_sharding=False
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Matches HF: cast back to the input dtype before the weight multiply.
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding table [V, D]; no scaling of the embeddings."""

    def __init__(self, vocab: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(std)
        self.embedding = nnx.Param(
            init(rngs.params(), (vocab, dim), param_dtype),
            out_sharding=(ax.VOCAB, ax.EMBED),
            eager_sharding=False,
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # FSDP: gather the table's embed dim before the lookup. Left split, the gathered rows
        # would come out split on D and the batch-sharded layout that follows could only be
        # reached by replicating the whole activation (XLA "involuntary full rematerialization").
        table = ax.constrain(self.embedding[...], (ax.VOCAB, None))  # [V, D]
        return jnp.take(table, ids, axis=0).astype(self.dtype)  # [B, T, D]


class MLP(nnx.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x)). Used by layer 0 and the MTP blocks."""

    def __init__(self, dim: int, hidden: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, (ax.EMBED, ax.MLP), **kw)
        self.up_proj = Linear(dim, hidden, (ax.EMBED, ax.MLP), **kw)
        self.down_proj = Linear(hidden, dim, (ax.MLP, ax.EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, D]


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, rotary_dim: int) -> jax.Array:
    """Partial NeoX rotary embedding on the first ``rotary_dim`` dims of each head.

    Dim i pairs with dim i + rotary_dim / 2 ("rotate_half"), not with its interleaved
    neighbour; dims from ``rotary_dim`` on pass through unchanged.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: int [B, T] absolute positions.
      theta: RoPE base.
      rotary_dim: number of rotated dims (even).

    Returns:
      [B, T, N, H] in x's dtype.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xr = x[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)
