"""RL losses against plain NumPy transcriptions of their formulas (loops, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics_testing import FP32_REL, assert_close

from mimo_jax.post_training import losses

# Three responses of unequal length (5, 2 and 3 tokens) after prompts of 2, 1 and 3 tokens, so
# that the aggregation modes give different values and prompt/padding positions exist.
B, T = 3, 7
MASK = np.zeros((B, T), np.float32)
MASK[0, 2:7] = 1
MASK[1, 1:3] = 1
MASK[2, 3:6] = 1


def _np_aggregate(values, mask, mode, norm_length=None):
    rows = []
    for b in range(values.shape[0]):
        toks = [float(values[b, t]) for t in range(values.shape[1]) if mask[b, t] > 0]
        rows.append(toks)
    if mode == "token-mean":
        flat = [v for row in rows for v in row]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in rows) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) if row else 0.0 for row in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(row) for row in rows) / len(rows) / (norm_length or values.shape[1])
    raise ValueError(mode)


def _np_surrogate(logp, old_logp, adv, mask, eps_low, eps_high, c):
    """Per-token loss, its derivative w.r.t. logp, and the three clip indicators."""
    loss, grad = np.zeros((B, T)), np.zeros((B, T))
    low, high, dual = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            a = float(adv[b])
            r = np.exp(float(logp[b, t]) - float(old_logp[b, t]))
            l1, l2 = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            value, d = (l1, -a * r) if l1 >= l2 else (l2, 0.0)
            if l2 > l1:
                low[b, t], high[b, t] = float(a < 0), float(a > 0)
            if c is not None and a < 0 and value > -a * c:
                value, d, dual[b, t] = -a * c, 0.0, 1.0
            loss[b, t], grad[b, t] = value, d
    return loss, grad, low, high, dual


def _case():
    """Log-probs whose ratios hit every branch: in range, above 1 + eps_high, below 1 - eps_low
    and above the dual-clip bound, with positive and negative advantages."""
    old_logp = np.linspace(-2.5, -0.3, B * T).reshape(B, T).astype(np.float32)
    log_ratio = np.zeros((B, T), np.float32)
    log_ratio[0, 2:7] = [0.05, 0.5, -0.5, 0.1, 1.5]  # A > 0: 0.5 and 1.5 clip high
    log_ratio[1, 1:3] = [-0.6, 0.02]  # A < 0: -0.6 clips low
    log_ratio[2, 3:6] = [1.5, -0.9, 0.3]  # A < 0: 1.5 passes c = 3 (dual), -0.9 clips low
    adv = np.array([1.3, -0.7, -1.1], np.float32)
    return old_logp + log_ratio, old_logp, adv


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_surrogate_matches_numpy(mode):
    logp, old_logp, adv = _case()
    eps_low, eps_high, c = 0.2, 0.28, 3.0

    def loss_fn(lp):
        return losses.clipped_surrogate(
            lp,
            old_logp,
            adv,
            MASK,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip_c=c,
            aggregation=mode,
        )

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logp))
    per_token, d_token, low, high, dual = _np_surrogate(
        logp, old_logp, adv, MASK, eps_low, eps_high, c
    )
    assert_close(loss, _np_aggregate(per_token, MASK, mode), FP32_REL, f"{mode} loss")
    # The gradient of the aggregate: d_token times the weight the mode gives each token.
    weights = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            unit = np.zeros((B, T))
            unit[b, t] = 1.0
            weights[b, t] = _np_aggregate(unit, MASK, mode) if MASK[b, t] else 0.0
    assert_close(grad, d_token * weights, FP32_REL, f"{mode} d loss / d logp")

    # Each branch is active on exactly the tokens chosen in _case (10 response tokens).
    assert low.sum() == 2 and high.sum() == 2 and dual.sum() == 1
    assert float(metrics["clip_frac_low"]) == pytest.approx(2 / 10)
    assert float(metrics["clip_frac_high"]) == pytest.approx(2 / 10)
    assert float(metrics["dual_clip_frac"]) == pytest.approx(1 / 10)
    log_ratio = (logp - old_logp)[MASK > 0]
    assert_close(metrics["approx_kl"], -log_ratio.astype(np.float64).mean(), FP32_REL, "approx_kl")
    assert_close(metrics["ratio_max"], np.exp(log_ratio.max()), FP32_REL, "ratio_max")
    assert_close(metrics["ratio_min"], np.exp(log_ratio.min()), FP32_REL, "ratio_min")


def test_aggregation_modes_differ_on_unequal_lengths():
    values = np.arange(B * T, dtype=np.float32).reshape(B, T) / 10
    got = {
        mode: float(losses.aggregate(jnp.asarray(values), MASK, mode))
        for mode in losses.AGGREGATIONS
    }
    for mode, value in got.items():
        assert_close(value, _np_aggregate(values, MASK, mode), FP32_REL, mode)
    assert len({round(v, 6) for v in got.values()}) == len(losses.AGGREGATIONS)
    # With equal lengths L the token mean equals the sequence mean of token means, and the
    # token-sum modes scale it by L and L / norm_length.
    full = np.ones((B, T), np.float32)
    token_mean = float(losses.aggregate(jnp.asarray(values), full, "token-mean"))
    assert_close(
        losses.aggregate(jnp.asarray(values), full, "seq-mean-token-mean"),
        token_mean,
        FP32_REL,
        "eq",
    )
    assert_close(
        losses.aggregate(jnp.asarray(values), full, "seq-mean-token-sum"),
        T * token_mean,
        FP32_REL,
        "s",
    )
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(jnp.asarray(values), full, "sum")


def test_masked_positions_change_nothing():
    logp, old_logp, adv = _case()
    ref_logp = old_logp - 0.3
    junk = np.where(MASK > 0, 0.0, 1e4).astype(np.float32)  # exp(1e4) overflows if ever taken

    def total(lp, olp, rlp):
        loss, _ = losses.clipped_surrogate(
            lp,
            olp,
            adv,
            MASK,
            eps_low=0.2,
            eps_high=0.2,
            dual_clip_c=3.0,
            aggregation="seq-mean-token-mean",
        )
        weights, _ = losses.importance_weights(lp, olp, MASK, low=0.5, high=2.0)
        return loss + losses.k3_kl(lp, rlp, MASK) + jnp.sum(weights)

    value_and_grad = jax.jit(jax.value_and_grad(total))
    clean_value, clean_grad = value_and_grad(jnp.asarray(logp), old_logp, ref_logp)
    dirty_value, dirty_grad = value_and_grad(
        jnp.asarray(logp + junk), old_logp - junk, ref_logp + junk
    )
    assert float(clean_value) == float(dirty_value)
    np.testing.assert_array_equal(np.asarray(clean_grad), np.asarray(dirty_grad))
    assert (np.asarray(clean_grad)[MASK == 0] == 0).all()


def test_group_advantages_grpo_and_dr_grpo():
    rewards = np.array(
        [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.3, 0.0]], np.float32
    )
    grpo, dr = np.zeros_like(rewards, np.float64), np.zeros_like(rewards, np.float64)
    for p, group in enumerate(rewards.astype(np.float64)):
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5  # sample std
        for g, r in enumerate(group):
            grpo[p, g], dr[p, g] = (r - mean) / (std + 1e-6), r - mean
    assert_close(losses.group_advantages(jnp.asarray(rewards)), grpo, FP32_REL, "GRPO")
    assert_close(
        losses.group_advantages(jnp.asarray(rewards), normalize_std=False), dr, FP32_REL, "Dr.GRPO"
    )
    flat = losses.group_advantages(jnp.asarray(rewards.reshape(-1)), group_size=4)
    assert_close(flat, grpo.reshape(-1), FP32_REL, "flat GRPO")
    assert (np.asarray(losses.group_advantages(jnp.asarray(rewards)))[1] == 0).all()  # tied group
    with pytest.raises(ValueError, match="group_size"):
        losses.group_advantages(jnp.asarray(rewards.reshape(-1)))


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_k3_kl(mode):
    logp, old_logp, _ = _case()
    ref_logp = old_logp
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if MASK[b, t]:
                d = float(ref_logp[b, t]) - float(logp[b, t])
                want[b, t] = np.exp(d) - d - 1
    kl = losses.k3_kl(jnp.asarray(logp), ref_logp, MASK, mode)
    assert_close(kl, _np_aggregate(want, MASK, mode), FP32_REL, f"k3 {mode}")
    assert float(kl) > 0
    assert float(losses.k3_kl(jnp.asarray(logp), logp, MASK, mode)) == 0.0


def test_importance_weights_mask_extreme_ratios():
    _, rollout_logp, _ = _case()
    log_ratio = np.zeros((B, T), np.float32)
    log_ratio[0, 2:7] = [0.0, np.log(2.5), np.log(0.4), 0.6, -0.6]  # 2.5 and 0.4 leave [0.5, 2]
    log_ratio[1, 1:3] = [np.log(1.9), 0.0]
    log_ratio[2, 3:6] = [-2.0, 0.1, 0.0]  # exp(-2) = 0.135 leaves it
    log_ratio[0, 0] = 5.0  # a prompt token far out of range: masked anyway, not counted
    train_logp = rollout_logp + log_ratio
    weights, share = losses.importance_weights(train_logp, rollout_logp, MASK, low=0.5, high=2.0)
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            r = np.exp(float(train_logp[b, t]) - float(rollout_logp[b, t]))
            want[b, t] = r if MASK[b, t] and 0.5 <= r <= 2.0 else 0.0
    assert_close(weights, want, FP32_REL, "importance weights")
    assert float(share) == pytest.approx(3 / 10)
    grad = jax.grad(
        lambda lp: jnp.sum(losses.importance_weights(lp, rollout_logp, MASK, low=0.5, high=2.0)[0])
    )
    assert (np.asarray(grad(jnp.asarray(train_logp))) == 0).all()  # sg[...]: a constant weight
