"""Closeness checks scaled to the magnitude of what they compare, shared by the model tests
(test_hf, test_model, test_moe) and the attention tests.

A bound is relative to the largest magnitude in the reference, max |got - want| <= rel *
max |want|: logits are ~0.5 in one test and ~3 in another, gradients smaller still, so one
absolute bound is loose for some and tight for others.
"""

import numpy as np

# Two fp32 computations of the same function that differ in summation order (XLA against
# PyTorch, scanned against unrolled layers) agree to a few fp32 epsilons (1.2e-7) per value; a
# forward through a few layers stays within ~2e-6 of the magnitude. 1e-5 leaves a small factor.
FP32_REL = 1e-5
# bf16 keeps 8 significant bits: each rounded value is off by up to 2^-9 (2e-3) of itself.
BF16_REL = 1e-2


def max_rel_diff(got, want) -> float:
    """max |got - want| / max |want| in fp64 (0 when both are all zeros).

    Args:
      got: array under test.
      want: reference array of the same shape.

    Returns:
      The largest absolute difference over the largest reference magnitude.
    """
    got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    diff, scale = np.abs(got - want).max(initial=0.0), np.abs(want).max(initial=0.0)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / scale)


def assert_close(got, want, rel: float, what: str):
    """Asserts equal shapes, finite values, and max |got - want| <= rel * max |want|.

    Prints the achieved difference (shown by ``pytest -s`` and with a failure), so bounds can
    be kept near the precision the code reaches.

    Args:
      got: array under test.
      want: reference array.
      rel: bound relative to max |want|; 0 demands equality.
      what: names the comparison in messages.
    """
    got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values in the result"
    assert np.isfinite(want).all(), f"{what}: non-finite values in the reference"
    diff, scale = np.abs(got - want).max(initial=0.0), np.abs(want).max(initial=0.0)
    message = (
        f"{what}: max |diff| {diff:.3g} = {max_rel_diff(got, want):.3g} x max |want| {scale:.3g}"
        f" (bound {rel:g} x)"
    )
    print(message)
    assert diff <= rel * scale, message
