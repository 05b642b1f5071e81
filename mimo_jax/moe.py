"""Sigmoid-routed mixture of experts with aux-loss-free balancing (reference section 2.6).

Router: fp32 logits and sigmoid; the correction bias shifts *selection* only (DeepSeek-V3
"noaux_tc"); group-limited top-k; gate weights come from the unbiased scores, optionally
renormalised, times ``routed_scaling_factor``. No shared expert.

Expert computation has interchangeable implementations over the same parameters:
  * ``dense``: every expert on every token, one-hot combine. The reference; O(T * E).
  * ``ragged``: sort the (token, expert) pairs by expert and run grouped matmuls
    (``jax.lax.ragged_dot``); dropless, O(T * k).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import sharding as sh
from mimo_jax.config import ModelConfig


class ExpertBias(nnx.Variable):
    """The router's correction bias: state moved by the balancing rule, not by gradients."""


class Router(nnx.Module):
    """Sigmoid router with correction bias and group-limited top-k."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        # fp32 regardless of param_dtype: bf16 routing mis-ranks experts (reference 2.6).
        self.kernel = nnx.Param(
            init(rngs.params(), (cfg.embed_dim, cfg.num_experts), jnp.float32),
            out_sharding=(sh.EMBED, None),
            eager_sharding=False,
        )
        self.bias = ExpertBias(
            jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=(None,), eager_sharding=False
        )
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, routing: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Routes tokens.

        Args:
          x: [T, D] tokens (any leading shape flattened by the caller).
          routing: optional int [T, k] expert ids to use instead of the router's choice
            (routing replay); gate weights still come from this router's scores.

        Returns:
          weights [T, k] fp32, expert ids int32 [T, k], scores [T, E] fp32 (unbiased sigmoid).
        """
        cfg = self.cfg
        logits = jnp.dot(
            x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST
        )  # [T, E]
        scores = jax.nn.sigmoid(logits)
        if routing is None:
            choice = scores + jax.lax.stop_gradient(self.bias[...])  # [T, E]
            choice = jax.lax.stop_gradient(_group_limit(choice, cfg))
            _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)  # [T, k]
        else:
            idx = routing
        idx = idx.astype(jnp.int32)
        weights = jnp.take_along_axis(scores, idx, axis=-1)  # [T, k]
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores


def _group_limit(choice: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Masks experts outside the ``topk_groups`` best groups (group score = sum of its top 2)."""
    if cfg.num_expert_groups == 1:
        return choice
    t, e = choice.shape
    grouped = choice.reshape(t, cfg.num_expert_groups, e // cfg.num_expert_groups)  # [T, g, E/g]
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, g]
    _, keep = jax.lax.top_k(group_scores, cfg.topk_groups)  # [T, topk_groups]
    group_mask = jnp.zeros_like(group_scores, dtype=bool).at[jnp.arange(t)[:, None], keep].set(True)
    mask = jnp.repeat(group_mask, e // cfg.num_expert_groups, axis=-1)  # [T, E]
    return jnp.where(mask, choice, -jnp.inf)


class MoE(nnx.Module):
    """Routed experts (SwiGLU, hidden ``moe_mlp_dim``) with a switchable implementation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, m = cfg.num_experts, cfg.embed_dim, cfg.moe_mlp_dim
        init = jax.nn.initializers.normal(cfg.initializer_range)
        pd = jnp.dtype(cfg.param_dtype)
        self.router = Router(cfg, rngs=rngs)
        self.wi_gate = nnx.Param(
            init(rngs.params(), (e, d, m), pd),
            out_sharding=(sh.EXPERT, sh.EMBED, sh.MOE_MLP),
            eager_sharding=False,
        )
        self.wi_up = nnx.Param(
            init(rngs.params(), (e, d, m), pd),
            out_sharding=(sh.EXPERT, sh.EMBED, sh.MOE_MLP),
            eager_sharding=False,
        )
        self.wo = nnx.Param(
            init(rngs.params(), (e, m, d), pd),
            out_sharding=(sh.EXPERT, sh.MOE_MLP, sh.EMBED),
            eager_sharding=False,
        )
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, routing: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the routed experts.

        Args:
          x: [B, T, D].
          routing: optional int [B, T, k] expert ids to replay.

        Returns:
          y [B, T, D] and aux: ``expert_load`` [E] (assignments per expert), ``routing``
          int32 [B, T, k], ``seq_aux_loss`` [] (DeepSeek-V3 sequence-wise balance loss, unweighted).
        """
        cfg = self.cfg
        b, t, d = x.shape
        k = cfg.num_experts_per_tok
        flat = x.reshape(b * t, d)  # [BT, D]
        replay = None if routing is None else routing.reshape(b * t, k)
        weights, idx, scores = self.router(flat, replay)  # [BT, k], [BT, k], [BT, E]
        dtype = jnp.dtype(cfg.dtype)
        if cfg.moe_impl == "dense":
            y = self._dense(flat.astype(dtype), weights, idx)
        elif cfg.moe_impl == "ragged":
            y = self._ragged(flat.astype(dtype), weights, idx)
        else:
            raise NotImplementedError(
                f"moe_impl={cfg.moe_impl!r} needs a device mesh; it is not implemented yet "
                "(use 'dense' or 'ragged')"
            )
        aux = {
            "expert_load": jnp.zeros((cfg.num_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0),
            "routing": idx.reshape(b, t, k),
            "seq_aux_loss": _sequence_aux_loss(scores.reshape(b, t, -1), idx.reshape(b, t, k), cfg),
        }
        return y.reshape(b, t, d).astype(x.dtype), aux

    def _weights(self, dtype):
        return (
            self.wi_gate[...].astype(dtype),
            self.wi_up[...].astype(dtype),
            self.wo[...].astype(dtype),
        )

    def _dense(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """Reference: every expert on every token, combined with one-hot gate weights."""
        wg, wu, wo = self._weights(x.dtype)
        gate = jnp.einsum("td,edm->tem", x, wg)  # [T, E, M]
        up = jnp.einsum("td,edm->tem", x, wu)
        out = jnp.einsum("tem,emd->ted", jax.nn.silu(gate) * up, wo)  # [T, E, D]
        combine = jnp.sum(
            jax.nn.one_hot(idx, self.cfg.num_experts, dtype=jnp.float32) * weights[..., None],
            axis=1,
        )  # [T, E]
        return jnp.einsum("ted,te->td", out.astype(jnp.float32), combine)

    def _ragged(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """Dropless grouped matmul: sort assignments by expert, ragged_dot, scatter back."""
        wg, wu, wo = self._weights(x.dtype)
        t, k = idx.shape
        flat_idx = idx.reshape(-1)  # [T*k]
        order = jnp.argsort(flat_idx, stable=True)  # [T*k]
        token = order // k  # source token of each sorted assignment
        xs = jnp.take(x, token, axis=0)  # [T*k, D]
        group_sizes = jnp.bincount(flat_idx, length=self.cfg.num_experts).astype(jnp.int32)  # [E]
        gate = jax.lax.ragged_dot(xs, wg, group_sizes)  # [T*k, M]
        up = jax.lax.ragged_dot(xs, wu, group_sizes)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, wo, group_sizes)  # [T*k, D]
        w = jnp.take(weights.reshape(-1), order)[:, None]  # [T*k, 1]
        return jax.ops.segment_sum(out.astype(jnp.float32) * w, token, num_segments=t)  # [T, D]


def _sequence_aux_loss(scores: jax.Array, idx: jax.Array, cfg: ModelConfig) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_e f_e * P_e, averaged over sequences.

    f_e = E / (k T) * (# tokens of the sequence routed to e); P_e = mean over the sequence of the
    normalised scores s / sum(s).

    Args:
      scores: [B, T, E] unbiased sigmoid scores.
      idx: int [B, T, k] selected experts.
      cfg: model config.

    Returns:
      [] scalar.
    """
    _, t, e = scores.shape
    k = idx.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    f = counts * (e / (k * t))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))
