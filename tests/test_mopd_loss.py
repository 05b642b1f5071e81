"""``losses.mopd_loss`` (the report's eqs. 7-9) against a NumPy transcription, with its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.post_training import losses

B, T = 4, 7


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-3, -0.05, (B, T)).astype(np.float32)
    teacher = rng.uniform(-3, -0.05, (B, T)).astype(np.float32)
    # Ratios pi / mu spread over [e^-2, e^2]: some below eps_low, some above eps_high.
    rollout = (logp - rng.uniform(-2, 2, (B, T))).astype(np.float32)
    lengths = np.array([7, 3, 1, 0])  # ragged, one row without response tokens
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    mask[0, :2] = 0  # a prompt part before the response
    orm = rng.normal(size=(B,)).astype(np.float32)
    return logp, teacher, rollout, mask, orm


def _numpy_loss(logp, teacher, rollout, mask, orm, eps_low, eps_high, alpha, baseline=False):
    """Eqs. 7-9 written out per sequence and token (``baseline``: minus the batch's mean
    teacher reward over response tokens)."""
    logp, teacher, rollout = (x.astype(np.float64) for x in (logp, teacher, rollout))
    total, grad = 0.0, np.zeros_like(logp)
    b0 = (teacher - logp)[mask > 0].mean() if baseline else 0.0
    for b in range(B):
        n = mask[b].sum()
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = np.exp(logp[b, t] - rollout[b, t])
            w = ratio if eps_low <= ratio <= eps_high else 0.0
            a = (teacher[b, t] - logp[b, t] - b0) + alpha * orm[b]
            total += -w * a * logp[b, t] / n
            grad[b, t] = -w * a / n / B
    return total / B, grad


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.5, 2.0), (0.8, 1.25)])
def test_loss_and_gradient_match_numpy(alpha, eps_low, eps_high, baseline):
    logp, teacher, rollout, mask, orm = _inputs()
    ratio = np.exp(logp - rollout)[mask > 0]
    assert (ratio < eps_low).any() and (ratio > eps_high).any()  # both bounds are exercised
    want, want_grad = _numpy_loss(
        logp, teacher, rollout, mask, orm, eps_low, eps_high, alpha, baseline
    )

    def f(lp):
        return losses.mopd_loss(
            lp, jnp.asarray(teacher), jnp.asarray(rollout), jnp.asarray(mask),
            eps_low=eps_low, eps_high=eps_high, alpha=alpha, orm_advantages=jnp.asarray(orm),
            baseline=baseline,
        )  # fmt: skip

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    valid = mask > 0
    kept = valid & (np.exp(logp - rollout) >= eps_low) & (np.exp(logp - rollout) <= eps_high)
    np.testing.assert_allclose(float(metrics["masked_share"]), 1 - kept.sum() / valid.sum(), 1e-6)
    np.testing.assert_allclose(
        float(metrics["reverse_kl"]), (logp - teacher)[valid].mean(), rtol=1e-5
    )


def test_padding_junk_changes_nothing():
    logp, teacher, rollout, mask, orm = _inputs(2)
    junk = lambda x: np.where(mask > 0, x, 1e4).astype(np.float32)  # noqa: E731

    def f(lp, te, ro):
        return losses.mopd_loss(lp, te, ro, mask, eps_low=0.5, eps_high=2.0, alpha=0.3,
                                orm_advantages=orm)[0]  # fmt: skip

    a, ga = jax.value_and_grad(f)(logp, teacher, rollout)
    b, gb = jax.value_and_grad(f)(junk(logp), junk(teacher), junk(rollout))
    assert float(a) == float(b) and np.array_equal(np.asarray(ga), np.asarray(gb))


def test_bad_arguments():
    logp, teacher, rollout, mask, _ = _inputs()
    with pytest.raises(ValueError, match="orm_advantages"):
        losses.mopd_loss(logp, teacher, rollout, mask, eps_low=0.5, eps_high=2.0, alpha=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        losses.mopd_loss(logp, teacher, rollout, mask, eps_low=1.5, eps_high=2.0)
