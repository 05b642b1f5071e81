"""Helpers shared by the attention tests (test_attention_xla, _pallas, _mgpu): random operands and
the relative bound per operand dtype for ``numerics_testing.assert_close``.

Bounds are relative to the largest magnitude in the reference: attention outputs are averages of
values (~0.1 to ~1) while gradients summed over GQA groups and windows reach ~10, so one absolute
bound is loose for the first and tight for the second.
"""

import jax.numpy as jnp
import numpy as np

# Relative bounds per operand dtype, a little above the worst the tests reach. fp32 paths differ
# from the fp32 reference only in summation order and exp / log (worst 3e-6). 16-bit operands are
# products of rounded values, and the probabilities are rounded to the operand dtype before PV as
# in every flash kernel: bf16 keeps 8 significant bits (worst 7e-3), f16 11 (worst 1.3e-3).
RTOL = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 5e-3,
}


def rtol(dtype) -> float:
    """The relative bound for operands of ``dtype``."""
    return RTOL[jnp.dtype(dtype)]


def random_inputs(
    seed: int,
    *,
    b: int,
    t: int,
    s: int,
    n: int,
    k: int,
    h: int,
    p: int,
    dtype=jnp.float32,
    sinks: bool = True,
    sinks_dtype=jnp.float32,
    ct_std: float = 1.0,
):
    """Standard-normal operands of one attention call.

    numpy's RNG rather than jax.random: compiling threefry costs more CPU time than a test case.

    Args:
      seed: RNG seed.
      b, t, s, n, k, h, p: batch, queries T, keys S, query heads N, kv heads K, head dims H, P.
      dtype: dtype of q, k, v and the cotangent.
      sinks: whether to draw sink logits (unit scale: comparable to the logits, so they take a
        visible share of the softmax mass).
      sinks_dtype: dtype of the sinks.
      ct_std: standard deviation of the output cotangent.

    Returns:
      (q [B, T, N, H], k [B, S, K, H], v [B, S, K, P], sinks [N] or None, ct [B, T, N, P]).
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, std=1.0, dt=dtype):
        return jnp.asarray(std * rng.standard_normal(shape, np.float32), dt)

    q, kk, v = normal(b, t, n, h), normal(b, s, k, h), normal(b, s, k, p)
    sink_logits = normal(n, dt=sinks_dtype) if sinks else None
    return q, kk, v, sink_logits, normal(b, t, n, p, std=ct_std)
