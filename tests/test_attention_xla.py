"""Tests for the pure-JAX attention path ``pallas_kernels.xla.attention_xla``.

Every case compares the forward output and all four gradients (dq, dk, dv, dsinks, via ``jax.vjp``
with a random cotangent) against the fp32 spec ``attention_reference``. Dims are small and odd so
block padding, GQA grouping and H != P are all exercised while the file stays fast on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import random_inputs, rtol
from numerics_testing import assert_close

from pallas_kernels import attention, xla
from pallas_kernels.reference import attention_reference


def _inputs(seed, *, b, t, s, n, kh, h, p, dtype, with_sinks):
    """Random q [B, T, N, H], k [B, S, K, H], v [B, S, K, P], sinks [N] | None (in q's dtype) and
    a cotangent scaled so gradients summed over GQA groups and the window stay O(1)."""
    return random_inputs(
        seed, b=b, t=t, s=s, n=n, k=kh, h=h, p=p, dtype=dtype, sinks=with_sinks,
        sinks_dtype=dtype, ct_std=0.25,
    )  # fmt: skip


# Tiny graphs spend ~all their time in XLA's LLVM backend; -O0 codegen compiles ~3x faster. It
# does not change results: without fast-math (off by default on XLA CPU) LLVM may not reorder
# floating-point operations at any optimisation level.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _fwd_vjp(fn, ref_fn, q, k, v, sinks, ct):
    """Outputs and (dq, dk, dv, dsinks) of ``fn`` and ``ref_fn`` at ``ct``, in one compile."""

    def both(q, k, v, sinks, ct):
        results = []
        for f in (fn, ref_fn):
            out, vjp = jax.vjp(f, q, k, v, sinks)
            results.append((out, vjp(ct)))
        return results

    args = (q, k, v, sinks, ct)
    return jax.jit(both).lower(*args).compile(_FAST_COMPILE)(*args)


def _with_sinks_arg(fn, use_sinks):
    """``fn`` as ``f(q, k, v, sinks)``, so every case has the same vjp signature.

    Without sinks the argument is ignored, and both implementations report a zero dsinks.
    """
    if use_sinks:
        return lambda q, k, v, sinks: fn(q, k, v, sinks=sinks)
    return lambda q, k, v, sinks: fn(q, k, v)


def _compare(fn, q, k, v, sinks, ct, **kwargs):
    """Checks ``fn`` against the reference: forward and every gradient, fp32 or bf16 tolerance."""
    tol = rtol(q.dtype)
    use_sinks = sinks is not None
    got_fn = _with_sinks_arg(functools.partial(fn, **kwargs), use_sinks)
    ref_fn = _with_sinks_arg(functools.partial(attention_reference, **kwargs), use_sinks)
    if not use_sinks:
        sinks = jnp.zeros((q.shape[2],), q.dtype)
    (out, grads), (ref_out, ref_grads) = _fwd_vjp(got_fn, ref_fn, q, k, v, sinks, ct)
    assert out.dtype == q.dtype
    assert_close(out, ref_out, tol, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, strict=True):
        assert_close(g, rg, tol, name)


F32, BF16 = jnp.float32, jnp.bfloat16

# (b, t, s, n, kh, h, p, window, with_sinks, dtype): window None is global attention. Not a full
# cross product: each case costs a compile, so every feature is covered without multiplying them.
CASES = {
    "swa_mha_sinks": (1, 37, 37, 3, 3, 16, 16, 5, True, F32),
    "swa_mha_nosinks": (1, 37, 37, 3, 3, 16, 16, 5, False, F32),
    "swa_gqa_h_ne_p_b2_sinks": (2, 37, 37, 6, 2, 24, 16, 9, True, F32),
    "swa_gqa_h_ne_p_b2_nosinks": (2, 37, 37, 6, 2, 24, 16, 9, False, F32),
    "swa_mqa_t200_w129_sinks": (1, 200, 200, 4, 1, 8, 8, 129, True, F32),
    "swa_window_gt_t_banded": (1, 37, 100, 3, 1, 8, 8, 50, True, F32),
    "swa_window_ge_s": (1, 37, 37, 2, 1, 8, 8, 64, True, F32),
    "swa_t1_b2": (2, 1, 50, 4, 2, 8, 8, 7, True, F32),
    "swa_t1_s1_nosinks": (1, 1, 1, 2, 2, 8, 8, 3, False, F32),
    "swa_window1": (1, 13, 13, 2, 1, 8, 8, 1, True, F32),
    "global_gqa_h_ne_p_b2_sinks": (2, 37, 37, 6, 2, 24, 16, None, True, F32),
    "global_mha_nosinks": (1, 37, 37, 3, 3, 16, 16, None, False, F32),
    "global_mqa_t_lt_s": (1, 11, 29, 4, 1, 8, 8, None, True, F32),
    "global_t1_nosinks": (1, 1, 23, 2, 2, 8, 8, None, False, F32),
    "bf16_swa_gqa_h_ne_p_sinks": (2, 37, 37, 6, 2, 24, 16, 9, True, BF16),
    "bf16_swa_mqa_t200_w129_nosinks": (1, 200, 200, 4, 1, 8, 8, 129, False, BF16),
    "bf16_global_gqa_h_ne_p_sinks": (2, 37, 37, 6, 2, 24, 16, None, True, BF16),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case):
    b, t, s, n, kh, h, p, window, with_sinks, dtype = CASES[case]
    q, k, v, sinks, ct = _inputs(
        0, b=b, t=t, s=s, n=n, kh=kh, h=h, p=p, dtype=dtype, with_sinks=with_sinks
    )
    _compare(xla.attention_xla, q, k, v, sinks, ct, sliding_window=window)


@pytest.mark.parametrize("window", [None, 6], ids=["global", "swa"])
def test_non_causal(window):
    q, k, v, sinks, ct = _inputs(
        1, b=2, t=19, s=23, n=4, kh=2, h=8, p=12, dtype=F32, with_sinks=True
    )
    _compare(xla.attention_xla, q, k, v, sinks, ct, sliding_window=window, causal=False)


def test_custom_scale():
    q, k, v, sinks, ct = _inputs(
        2, b=1, t=17, s=17, n=2, kh=1, h=8, p=8, dtype=F32, with_sinks=True
    )
    _compare(xla.attention_xla, q, k, v, sinks, ct, sliding_window=4, scale=0.3)


@pytest.mark.parametrize(
    "t,s,window,block_q", [(37, 37, 5, 1), (37, 37, 17, 4), (41, 60, 9, 8), (29, 29, 30, 8)]
)
def test_banded_block_sizes(t, s, window, block_q):
    """Many small blocks: chunk alignment, left padding and multi-chunk windows (W - 1 > bq)."""
    q, k, v, sinks, ct = _inputs(
        3, b=2, t=t, s=s, n=6, kh=3, h=24, p=16, dtype=F32, with_sinks=True
    )
    banded = functools.partial(xla._banded_attention, scale=24**-0.5, block_q=block_q)
    _compare(banded, q, k, v, sinks, ct, sliding_window=window)


@pytest.mark.parametrize(
    "t,window", [(1, 7), (37, 129), (200, 129), (8192, 129), (4096, 16), (100, 4096)]
)
def test_default_block_q(t, window):
    bq = xla.default_block_q(t, window)
    nb = -(-t // bq)
    assert 1 <= bq <= max(t, 1)
    assert nb * bq - t < nb  # balanced split: less than one padded row per block
    assert bq <= 128


# A wrapped ring buffer of 8 slots holding positions 4..11, and a half-empty cache.
_KV_POS = [[8, 9, 10, 11, 4, 5, 6, 7], [-1, -1, 2, 3, 0, 1, -1, -1]]


@pytest.mark.parametrize(
    "causal,window,with_sinks,dtype",
    [
        (True, 4, True, F32),
        (True, 4, False, F32),
        (True, None, False, F32),
        (False, 4, True, F32),
        (False, None, False, F32),
        (True, 4, True, BF16),
    ],
    ids=["swa_sinks", "swa_nosinks", "global_nosinks", "bidir_swa", "bidir_global", "swa_bf16"],
)
def test_positions_ring_buffer(causal, window, with_sinks, dtype):
    q, k, v, sinks, ct = _inputs(
        4, b=2, t=3, s=8, n=4, kh=2, h=24, p=16, dtype=dtype, with_sinks=with_sinks
    )
    kv_pos = jnp.array(_KV_POS, jnp.int32)
    # Row 0 verifies 3 drafted tokens; row 1 includes a query at position -2 (a padded slot) that
    # sees nothing when causal, which must give 0 (sink-only or empty row), never NaN.
    q_pos = jnp.array([[9, 10, 11], [-2, 2, 3]], jnp.int32)
    _compare(
        xla.attention_xla,
        q,
        k,
        v,
        sinks,
        ct,
        sliding_window=window,
        causal=causal,
        q_positions=q_pos,
        kv_positions=kv_pos,
    )


def test_empty_cache_rows_are_zero():
    """Nothing visible and no sink: output exactly 0, gradients finite (no NaN from 0 / 0)."""
    q, k, v, _, ct = _inputs(5, b=1, t=2, s=4, n=2, kh=1, h=8, p=8, dtype=F32, with_sinks=False)
    kwargs = dict(
        sliding_window=2,
        q_positions=jnp.array([[0, 1]], jnp.int32),
        kv_positions=jnp.full((1, 4), -1, jnp.int32),
    )
    fn = _with_sinks_arg(functools.partial(xla.attention_xla, **kwargs), False)
    ref = _with_sinks_arg(functools.partial(attention_reference, **kwargs), False)
    (out, grads), _ = _fwd_vjp(fn, ref, q, k, v, jnp.zeros((2,)), ct)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    for name, g in zip(("dq", "dk", "dv", "dsinks"), grads, strict=True):
        np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)


def test_front_door_dispatches_to_xla():
    q, k, v, sinks, _ = _inputs(6, b=1, t=21, s=21, n=4, kh=2, h=8, p=8, dtype=F32, with_sinks=True)

    @jax.jit
    def both(q, k, v, sinks):
        got = attention(q, k, v, sinks=sinks, sliding_window=5, implementation="xla")
        return got, xla.attention_xla(q, k, v, sinks=sinks, sliding_window=5)

    got, want = both(q, k, v, sinks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "case,kwargs",
    [
        ("heads", dict(n=6, kh=4)),
        ("sinks_len", dict(sinks_len=3)),
        ("window_zero", dict(sliding_window=0)),
        ("window_negative", dict(sliding_window=-5)),
        ("implementation", dict(implementation="cuda")),
    ],
)
def test_front_door_rejects(case, kwargs):
    n, kh = kwargs.pop("n", 4), kwargs.pop("kh", 2)
    sinks_len = kwargs.pop("sinks_len", n)
    q = jnp.zeros((1, 5, n, 8))
    k = jnp.zeros((1, 5, kh, 8))
    v = jnp.zeros((1, 5, kh, 8))
    with pytest.raises(ValueError):
        attention(q, k, v, sinks=jnp.zeros((sinks_len,)), **kwargs)


def _max_intermediate_size(jaxpr) -> int:
    """Largest number of elements of any value produced inside ``jaxpr`` or its sub-jaxprs."""
    biggest = 0
    for var in getattr(jaxpr, "constvars", []):
        biggest = max(biggest, int(np.prod(var.aval.shape)))
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if hasattr(sub, "eqns"):  # Jaxpr
                    biggest = max(biggest, _max_intermediate_size(sub))
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
                    biggest = max(biggest, _max_intermediate_size(sub.jaxpr))
    return biggest


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_banded_never_builds_t_by_s(impl):
    """Forward + backward of SWA at T = 4096, W = 16 never holds a [T, S]-sized array.

    The same check must flag the reference (which materialises [B, K, G, T, S]), proving the
    walker sees the intermediates it is meant to catch.
    """
    t, window = 4096, 16
    fn = xla.attention_xla if impl == "xla" else attention_reference

    def loss(q, k, v, sinks):
        return jnp.sum(fn(q, k, v, sinks=sinks, sliding_window=window))

    specs = (
        jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32),
        jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32),
        jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.float32),
    )
    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*specs)
    biggest = _max_intermediate_size(closed.jaxpr)
    limit = t * t // 4
    if impl == "xla":
        assert biggest < limit, f"banded SWA built an array of {biggest} >= T*T/4 = {limit}"
    else:
        assert biggest >= limit, f"walker missed the reference's [T, S] scores ({biggest})"
