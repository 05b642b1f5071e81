"""How a token is picked from logits, and the log-probability of the pick.

``generate`` draws every token (first token, MTP drafts, the main model's tokens in ``accept``)
through these functions, so a rollout's recorded log-probabilities come from the same
distribution its tokens were drawn from (docs/decoding.md, "Rollouts").
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is picked from logits: greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def truncated_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled fp32 logits with -inf outside top-k / nucleus top-p.

    Args:
      logits: [..., V].
      sampling: a non-greedy ``Sampling``.

    Returns:
      fp32 [..., V]; their softmax is the distribution tokens are drawn from.
    """
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution tokens are drawn from: fp32 [..., V] from logits [..., V], the
    temperature-scaled softmax truncated to top-k / top-p and renormalised."""
    return jax.nn.softmax(truncated_logits(logits, sampling), axis=-1)


def pick(
    logits: jax.Array, key: jax.Array | None, sampling: Sampling
) -> tuple[jax.Array, jax.Array | None]:
    """Picks one token per row.

    Args:
      logits: [B, V].
      key: PRNG key (unused when greedy).
      sampling: how the token is picked.

    Returns:
      token int32 [B], and the distribution it was drawn from [B, V] (None when greedy).
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    p = probs(logits, sampling)
    return jax.random.categorical(key, jnp.log(p)).astype(jnp.int32), p


def token_logprobs(logits: jax.Array, tokens: jax.Array, sampling: Sampling) -> jax.Array:
    """Log-probability of ``tokens`` under the distribution ``sampling`` draws from ``logits``.

    Sampling: the temperature-scaled distribution truncated to top-k / top-p and renormalised
    (``probs``), the one the token was drawn from. Greedy has no such distribution: it gives the
    log-softmax of the raw logits (temperature 1, no truncation).

    Args:
      logits: [..., V].
      tokens: int [...] one token per row of ``logits``.
      sampling: how the tokens were picked.

    Returns:
      fp32 [...].
    """
    if sampling.greedy:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        logp = jax.nn.log_softmax(truncated_logits(logits, sampling), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
