"""RL losses as pure functions of arrays: group advantages, the clipped surrogate, k3 KL and the
training-inference importance weight.

Conventions follow verl's ``core_algos`` (names of the aggregation modes, the clip and dual-clip
metrics) and the GRPO / Dr.GRPO papers; the masked importance weight is eq. 8 of the
MiMo-V2-Flash technical report, section 4.4. ``docs/post_training.md`` states the formulas.

Token arrays are [B, T] (B sequences, T positions); ``mask`` is 1 (or True) at the response
tokens that count and 0 at prompt, padding and tool-output positions. A masked position never
reaches an ``exp``: its log-ratio is replaced by 0 first, so any value there (even inf or nan)
changes neither the result nor the gradient.
"""

import jax
import jax.numpy as jnp

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of ``x`` over the positions where ``mask`` is set (0 where none is).

    Args:
      x: values, e.g. [B, T].
      mask: weights of the same shape, 0/1 float or bool.
      axis: axis to reduce; None reduces all.

    Returns:
      sum(x * mask) / sum(mask) over ``axis``; 0 where the mask sums to 0.
    """
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    # Dividing by 1 where the count is 0 keeps the gradient finite; the sum there is 0 anyway.
    return total / jnp.where(count > 0, count, 1.0)


def aggregate(
    values: jax.Array, mask: jax.Array, mode: str = "token-mean", norm_length: int | None = None
) -> jax.Array:
    """Reduces per-token values [B, T] to a scalar loss, in one of verl's ``loss_agg_mode`` modes.

    - ``token-mean``: mean over every response token of the batch (long responses weigh more).
    - ``seq-mean-token-mean``: mean over the B sequences of each sequence's token mean (GRPO).
    - ``seq-mean-token-sum``: mean over the B sequences of each sequence's token sum.
    - ``seq-mean-token-sum-norm``: mean over the B sequences of token sum / ``norm_length``
      (Dr.GRPO: a constant divisor, so no length bias).

    The sequence means divide by B, all rows included: a row without response tokens adds 0.

    Args:
      values: [B, T] per-token values.
      mask: [B, T] response-token mask.
      mode: one of ``AGGREGATIONS``.
      norm_length: divisor of ``seq-mean-token-sum-norm``; defaults to T. Keep it fixed over a
        run (e.g. the maximum response length), as Dr.GRPO prescribes.

    Returns:
      [] the aggregated value.
    """
    if mode == "token-mean":
        return masked_mean(values, mask)
    mask = mask.astype(jnp.float32)
    seq_sum = jnp.sum(jnp.where(mask > 0, values * mask, 0.0), axis=-1)  # [B]
    if mode == "seq-mean-token-sum":
        return jnp.mean(seq_sum)
    if mode == "seq-mean-token-mean":
        return jnp.mean(masked_mean(values, mask, axis=-1))
    if mode == "seq-mean-token-sum-norm":
        return jnp.mean(seq_sum) / (values.shape[-1] if norm_length is None else norm_length)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def group_advantages(
    rewards: jax.Array,
    *,
    group_size: int | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """GRPO advantages: each reward minus its group's mean, over the group's std (Dr.GRPO: not).

    A = (r - mean_group(r)) / (std_group(r) + eps), with the sample standard deviation (Bessel's
    correction, ddof=1), as verl (``torch.std``) and Tunix compute it. With ``normalize_std=False``
    A = r - mean_group(r) (Dr.GRPO). A group whose rewards all tie gets A = 0.

    Args:
      rewards: [P, G] (P prompts, G samples each) or [P * G] grouped by prompt (the G samples of a
        prompt adjacent), then ``group_size=G`` is required.
      group_size: G for flat rewards.
      normalize_std: divide by the group std (GRPO) or not (Dr.GRPO).
      eps: added to the std so tied groups stay finite.

    Returns:
      fp32 advantages of the shape of ``rewards``.
    """
    shape = rewards.shape
    if rewards.ndim == 1:
        if group_size is None:
            raise ValueError("flat rewards [P * G] need group_size=G")
        rewards = rewards.reshape(-1, group_size)  # [P, G]
    elif rewards.ndim != 2:
        raise ValueError(f"rewards must be [P, G] or [P * G], got shape {shape}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"a group needs at least 2 samples for a baseline, got G={rewards.shape[1]}"
        )
    rewards = rewards.astype(jnp.float32)
    adv = rewards - jnp.mean(rewards, axis=1, keepdims=True)  # [P, G]
    if normalize_std:
        adv = adv / (jnp.std(rewards, axis=1, keepdims=True, ddof=1) + eps)
    return adv.reshape(shape)


def _log_ratio(logp: jax.Array, base_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """logp - base_logp at response tokens, 0 elsewhere: [B, T] x3 -> [B, T] fp32."""
    diff = logp.astype(jnp.float32) - base_logp.astype(jnp.float32)
    return jnp.where(mask > 0, diff, 0.0)


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
    token_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO/GRPO token-level clipped surrogate with asymmetric clip (DAPO) and dual clip.

    Per token, ratio = exp(logp - old_logp):
      l = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
      l = min(l, -A * c) where A < 0 (dual clip, when ``dual_clip_c`` = c is given)
    then ``aggregate(w * l, mask, aggregation)``. A clipped token has zero gradient: the high
    clip acts where A > 0 and ratio > 1 + eps_high, the low clip where A < 0 and
    ratio < 1 - eps_low, the dual clip where A < 0 and ratio > c.

    Args:
      logp: [B, T] log-probs of the sampled tokens under the policy being trained.
      old_logp: [B, T] the same under the policy that sampled them (no gradient flows).
      advantages: [B] per sequence (broadcast over T) or [B, T] per token.
      mask: [B, T] response-token mask.
      eps_low: lower clip, ratio floor 1 - eps_low.
      eps_high: upper clip, ratio ceiling 1 + eps_high (DAPO's clip-higher: eps_high > eps_low).
      dual_clip_c: the dual-clip bound c > 1 for negative advantages; None disables it.
      aggregation: one of ``AGGREGATIONS``.
      norm_length: the ``seq-mean-token-sum-norm`` divisor (see ``aggregate``).
      token_weights: optional [B, T] per-token weights, treated as constants (e.g. the masked
        training-inference weight of ``importance_weights``).

    Returns:
      (loss [], metrics) where metrics, all token means over the mask, hold ``clip_frac_low``,
      ``clip_frac_high``, ``dual_clip_frac``, ``approx_kl`` (mean of old_logp - logp, verl's
      ``ppo_kl``), ``ratio_mean``, and ``ratio_min`` / ``ratio_max`` over response tokens.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    old_logp = jax.lax.stop_gradient(old_logp)
    log_ratio = _log_ratio(logp, old_logp, mask)  # [B, T]
    ratio = jnp.exp(log_ratio)  # [B, T]
    adv = advantages.astype(jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]  # [B, 1]
    adv = jnp.broadcast_to(adv, ratio.shape)  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)  # [B, T]
    clip_active = clipped > unclipped
    dual_active = jnp.zeros_like(clip_active)
    if dual_clip_c is not None:
        dual_active = (adv < 0) & (per_token > -adv * dual_clip_c)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -adv * dual_clip_c), per_token)
    if token_weights is not None:
        per_token = jax.lax.stop_gradient(token_weights.astype(jnp.float32)) * per_token
    loss = aggregate(per_token, mask, aggregation, norm_length)

    valid = mask > 0
    metrics = {
        "clip_frac_low": masked_mean((clip_active & (adv < 0)).astype(jnp.float32), mask),
        "clip_frac_high": masked_mean((clip_active & (adv > 0)).astype(jnp.float32), mask),
        "dual_clip_frac": masked_mean(dual_active.astype(jnp.float32), mask),
        "approx_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def k3_kl(
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
) -> jax.Array:
    """k3 estimator of KL(pi || pi_ref) over sampled tokens, aggregated like the loss.

    Per token, with d = ref_logp - logp: exp(d) - d - 1 (>= 0, 0 where the log-probs agree;
    unbiased for the KL when the tokens are sampled from pi). The gradient flows through
    ``logp``; ``ref_logp`` is a constant.

    Args:
      logp: [B, T] log-probs under the trained policy.
      ref_logp: [B, T] log-probs under the frozen reference.
      mask: [B, T] response-token mask.
      aggregation: one of ``AGGREGATIONS``.
      norm_length: the ``seq-mean-token-sum-norm`` divisor (see ``aggregate``).

    Returns:
      [] the aggregated k3 KL.
    """
    d = _log_ratio(jax.lax.stop_gradient(ref_logp), logp, mask)  # [B, T]
    return aggregate(jnp.exp(d) - d - 1.0, mask, aggregation, norm_length)


def importance_weights(
    train_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, *, low: float, high: float
) -> tuple[jax.Array, jax.Array]:
    """Truncated, masked training-inference importance weight (the technical report's eq. 8).

    w_t = sg[pi_train / pi_rollout] where low <= pi_train / pi_rollout <= high, else 0: a token
    the two engines disagree on too much is dropped rather than clipped (IcePop-style). The
    weight carries no gradient.

    Args:
      train_logp: [B, T] log-probs of the sampled tokens under the training forward.
      rollout_logp: [B, T] the log-probs the rollout engine recorded for them.
      mask: [B, T] response-token mask.
      low: smallest kept ratio (e.g. 0.5).
      high: largest kept ratio (e.g. 2).

    Returns:
      (weights [B, T] fp32, 0 outside the mask and outside [low, high]; masked_share [] the
      share of response tokens whose ratio left [low, high]).
    """
    ratio = jnp.exp(_log_ratio(train_logp, rollout_logp, mask))  # [B, T]
    ratio = jax.lax.stop_gradient(ratio)
    valid = mask > 0
    kept = valid & (ratio >= low) & (ratio <= high)
    weights = jnp.where(kept, ratio, 0.0)
    masked_share = masked_mean((valid & ~kept).astype(jnp.float32), mask)
    return weights, masked_share


def mopd_loss(
    logp: jax.Array,
    teacher_logp: jax.Array,
    rollout_logp: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    alpha: float = 0.0,
    orm_advantages: jax.Array | None = None,
    baseline: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-teacher on-policy distillation surrogate (the technical report's eqs. 7-9).

    Per response token t of a sequence y sampled by the rollout engine (mu):

      A_t = sg[log pi_teacher(y_t) - log pi(y_t)] + alpha * A_ORM         (eq. 9)
      w_t = sg[pi(y_t) / mu(y_t)]  if eps_low <= pi / mu <= eps_high, else 0   (eq. 8)
      L   = -mean_over_B[ (1 / |y|) * sum_t w_t * A_t * log pi(y_t) ]    (eq. 7)

    The first advantage term is the per-token reverse-KL reward of the prompt's domain teacher;
    A_ORM, the outcome advantage (e.g. ``group_advantages`` of the verifier's rewards), is
    broadcast over the response, and 0 where a domain has no verifier. There is no ratio clip:
    the masked weight plays that role. Each sequence is normalised by its own response length
    |y| (its mask sum); the mean is over all B rows, a row without response tokens adding 0.

    Args:
      logp: [B, T] the student's log-probs of the sampled tokens (training forward).
      teacher_logp: [B, T] the prompt's teacher's log-probs of the same tokens (constant).
      rollout_logp: [B, T] the log-probs the rollout engine recorded (constant).
      mask: [B, T] response-token mask.
      eps_low: smallest kept ratio pi / mu.
      eps_high: largest kept ratio pi / mu.
      alpha: weight of the outcome advantage.
      orm_advantages: [B] per-sequence outcome advantages (required when alpha != 0).
      baseline: subtract the batch's mean reverse-KL reward (over its response tokens) from
        each token's: a constant baseline, which leaves the expected gradient unchanged and
        lowers its variance (not in the report's eq. 9; off by default).

    Returns:
      (loss [], metrics): ``reverse_kl`` (token mean over the mask of log pi - log pi_teacher,
      the k1 estimate of KL(pi || pi_teacher) on the student's samples), ``masked_share``
      (share of response tokens whose weight eq. 8 zeroed) and ``advantage_mean``.
    """
    if alpha and orm_advantages is None:
        raise ValueError("mopd_loss: alpha != 0 needs orm_advantages")
    if not 0 < eps_low <= 1 <= eps_high:
        raise ValueError(f"mopd_loss: need 0 < eps_low <= 1 <= eps_high, got {eps_low}, {eps_high}")
    weights, masked_share = importance_weights(
        logp, rollout_logp, mask, low=eps_low, high=eps_high
    )  # [B, T], []
    reverse_kl_reward = _log_ratio(jax.lax.stop_gradient(teacher_logp), logp, mask)  # [B, T]
    adv = jax.lax.stop_gradient(reverse_kl_reward)
    if baseline:
        adv = jnp.where(mask > 0, adv - masked_mean(adv, mask), 0.0)
    if alpha:
        adv = adv + alpha * orm_advantages.astype(jnp.float32)[:, None]
    per_token = -weights * adv * jnp.where(mask > 0, logp.astype(jnp.float32), 0.0)
    loss = aggregate(per_token, mask, "seq-mean-token-mean")
    metrics = {
        "reverse_kl": masked_mean(-reverse_kl_reward, mask),
        "masked_share": masked_share,
        "advantage_mean": masked_mean(adv, mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
