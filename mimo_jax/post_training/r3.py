"""Rollout Routing Replay (R3) figures: how far the training forward drifts from the rollout.

The rollout engine (e.g. a bf16 copy of the policy) records the experts it used
(``generate(..., return_routing=True)``); the training forward replays them
(``model(tokens, routing=...)``) and also reports the experts its own router would have chosen
(``aux["router_choice"]``). These pure, jit-able functions measure the gap on the tokens of a
mask (the response tokens):

* ``routing_disagreement``: share of (token, MoE layer) decisions whose expert sets differ;
* ``train_inference_kl``: k3 estimate of KL(pi_rollout || pi_train) over the sampled tokens;
* ``extreme_ratio_share``: share of tokens whose ratio pi_train / pi_rollout leaves [low, high].

Every mean over an empty mask is 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import DENSE, ModelConfig


def moe_layer_mask(cfg: ModelConfig) -> np.ndarray:
    """Which decoder layers route to experts.

    Args:
      cfg: model config.

    Returns:
      bool [L]: True at MoE layers, False at dense-FFN layers.
    """
    return np.array([t != DENSE for t in cfg.mlp_layer_types], bool)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(mask * x) / max(sum(mask), 1) in fp32."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(mask * x.astype(jnp.float32)) / jnp.maximum(jnp.sum(mask), 1.0)


def routing_disagreement(
    own: jax.Array, rollout: jax.Array, mask: jax.Array, moe_layers: jax.Array
) -> jax.Array:
    """Share of routing decisions where the training router's own top-k differs from the rollout's.

        D = sum_{l, b, t} s_l m_bt [set(own_lbt) != set(rollout_lbt)] / (sum_l s_l * sum_bt m_bt)

    with s the MoE-layer indicator and m the token mask. Sets, not sequences: the order of the k
    ids does not matter.

    Args:
      own: int [L, B, T, k] the training router's own choice (``aux["router_choice"]``).
      rollout: int [L, B, T, k] the rollout's experts (``Rollouts.routing``); must be recorded
        (>= 0) wherever mask = 1 on MoE layers.
      mask: [B, T] 1 at the tokens to count (e.g. ``Rollouts.response_mask``), 0 elsewhere.
      moe_layers: bool [L] (``moe_layer_mask``).

    Returns:
      [] fp32 in [0, 1].
    """
    differs = jnp.any(jnp.sort(own, axis=-1) != jnp.sort(rollout, axis=-1), axis=-1)  # [L, B, T]
    layers = jnp.asarray(moe_layers, jnp.float32)  # [L]
    weight = layers[:, None, None] * mask.astype(jnp.float32)[None]  # [L, B, T]
    return _masked_mean(differs, weight)


def train_inference_kl(
    train_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array
) -> jax.Array:
    """k3 estimate of KL(pi_rollout || pi_train) over the sampled tokens.

    With log r = train_logp - rollout_logp (tokens drawn from pi_rollout, so E[r] = 1):

        KL ~= sum_bt m_bt (r_bt - 1 - log r_bt) / sum_bt m_bt

    Each term is >= 0 and the estimate is unbiased (Schulman's k3).

    Args:
      train_logp: [B, T] log pi_train of the sampled tokens.
      rollout_logp: [B, T] log pi_rollout of the same tokens (``Rollouts.logprobs``).
      mask: [B, T] 1 at sampled tokens.

    Returns:
      [] fp32.
    """
    log_r = train_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32)
    return _masked_mean(jnp.exp(log_r) - 1.0 - log_r, mask)


def extreme_ratio_share(
    train_logp: jax.Array,
    rollout_logp: jax.Array,
    mask: jax.Array,
    low: float = 0.5,
    high: float = 2.0,
) -> jax.Array:
    """Share of sampled tokens whose ratio pi_train / pi_rollout lies outside [low, high].

        share = sum_bt m_bt [r_bt < low or r_bt > high] / sum_bt m_bt,
        r = exp(train_logp - rollout_logp)

    compared in log space, so huge ratios do not overflow.

    Args:
      train_logp: [B, T] log pi_train of the sampled tokens.
      rollout_logp: [B, T] log pi_rollout of the same tokens.
      mask: [B, T] 1 at sampled tokens.
      low: lower ratio bound (> 0).
      high: upper ratio bound (>= low).

    Returns:
      [] fp32 in [0, 1].

    Raises:
      ValueError: unless 0 < low <= high.
    """
    if not 0 < low <= high:
        raise ValueError(f"extreme_ratio_share needs 0 < low <= high, got low={low}, high={high}")
    log_r = train_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32)
    outside = (log_r < np.log(low)) | (log_r > np.log(high))
    return _masked_mean(outside, mask)
