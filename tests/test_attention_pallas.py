"""Pallas TPU flash attention (``kernel="tpu"``) vs the fp32 reference: forward, dq, dk, dv,
dsinks, and decode.

On CPU the kernels run in the Pallas interpreter (the front door's default there); on a TPU set
``MIMO_PALLAS_INTERPRET=0`` to run them compiled. Dimensions are tiny and prime-ish, tiles are 16
so every case spans several q and kv blocks and windows cut blocks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import random_inputs, rtol
from numerics_testing import assert_close

from pallas_kernels import attention, attention_reference, default_interpret, flash
from pallas_kernels.flash_common import BlockSizes, kv_block_bounds, num_kv_steps, q_block_bounds
from pallas_kernels.reference import visibility_mask

BLOCKS = BlockSizes.uniform(16)
INTERPRET = default_interpret()
if not INTERPRET and jax.default_backend() != "tpu":
    pytest.skip(
        "compiled Pallas TPU kernels need a TPU; elsewhere the interpreter runs them",
        allow_module_level=True,
    )


def _pallas(q, k, v, **kw):
    """The front door with the Pallas TPU kernels (interpreted on CPU)."""
    return attention(q, k, v, **kw, implementation="pallas", kernel="tpu")


@pytest.fixture(autouse=True)
def _full_precision_reference():
    # On GPU, XLA would run the fp32 reference's einsums in TF32; compare against true fp32.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _fast_interpret_compiles():
    # Interpreted kernels are large HLO programs that run for milliseconds; XLA's optimisation
    # passes dominate the test time, so skip them (only when interpreting).
    name = "jax_disable_most_optimizations"
    old = jax.config.values.get(name)
    if old is None or not INTERPRET:
        yield  # compiled kernels: keep XLA's defaults (and tolerate the flag going away)
        return
    jax.config.update(name, True)
    try:
        yield
    finally:
        jax.config.update(name, old)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 1
    t: int = 37
    s: int | None = None  # None: S = T
    n: int = 4
    k: int = 2
    h: int = 24
    p: int = 16
    window: int | None = 13
    sinks: bool = True
    causal: bool = True
    dtype: type = jnp.float32
    blocks: BlockSizes = BLOCKS


CASES = {
    "swa_sinks_gqa_t_not_multiple": Case(t=67),
    "global_sinks_mha_batch2_t_lt_s": Case(b=2, t=37, s=53, k=4, window=None),
    "swa_sinks_mqa": Case(t=45, k=1, window=20),
    "window_larger_than_t": Case(t=37, window=100, sinks=False),
    "t1_swa_sinks": Case(t=1, s=37, k=4, window=5),
    "swa_non_causal": Case(t=37, window=7, causal=False),
    "mixed_tiles_t_lt_s_g3": Case(
        t=50, s=61, n=6, k=2, window=17, blocks=BlockSizes(16, 32, 32, 16, 16)
    ),
    "bf16_swa_sinks_gqa": Case(t=45, dtype=jnp.bfloat16),
    "swa_sinks_gqa_batch2": Case(b=2, t=45),
    "bf16_global_mqa_no_sinks": Case(t=37, k=1, window=None, sinks=False, dtype=jnp.bfloat16),
}


def _inputs(c: Case, seed=0):
    s = c.t if c.s is None else c.s
    # The sinks are drawn even when unused: the VJP signature stays (q, k, v, sinks).
    return random_inputs(seed, b=c.b, t=c.t, s=s, n=c.n, k=c.k, h=c.h, p=c.p, dtype=c.dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(name):
    c = CASES[name]
    q, k, v, sinks, ct = _inputs(c)

    def run(fn):
        def f(q, k, v, sinks):
            return fn(
                q,
                k,
                v,
                sinks=sinks if c.sinks else None,
                sliding_window=c.window,
                causal=c.causal,
            )

        o, vjp = jax.vjp(f, q, k, v, sinks)
        return (o, *vjp(ct))

    pallas = jax.jit(lambda: run(lambda *a, **kw: _pallas(*a, **kw, block_sizes=c.blocks)))()
    ref = jax.jit(lambda: run(attention_reference))()
    for label, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), pallas, ref, strict=True):
        if label == "dsinks" and not c.sinks:
            continue
        assert_close(got, want, rtol(c.dtype), f"{name} {label}")


def test_front_door_uses_pallas():
    c = Case(t=21, window=9)
    q, k, v, sinks, _ = _inputs(c, seed=3)
    kw = dict(sinks=sinks, sliding_window=c.window)
    # No kernel, interpret or tiles: the backend's defaults (the "tpu" kernels, 128-row tiles).
    got = attention(q, k, v, **kw, implementation="pallas")
    want = jax.jit(lambda q, k, v: attention_reference(q, k, v, **kw))(q, k, v)
    assert_close(got, want, rtol(c.dtype), "front door")


def _ring_cache(b, window, t):
    """Positions of a ring of W + 4 slots after writing positions 0 .. 3W - 1 (wrapped 3 times)."""
    slots = window + 4
    kv_pos = np.full((b, slots), -1, np.int32)
    for pos in range(3 * window):
        kv_pos[:, pos % slots] = pos
    kv_pos[1:, (3 * window - 7) % slots] = -1  # an evicted/empty slot inside the window
    q_pos = np.broadcast_to(np.arange(3 * window - t, 3 * window, dtype=np.int32), (b, t))
    return jnp.asarray(q_pos), jnp.asarray(kv_pos)


@pytest.mark.parametrize(
    "t, kv_heads, window, sinks, dtype",
    [
        (3, 2, 29, True, jnp.float32),
        (5, 4, 29, True, jnp.bfloat16),
        (1, 1, 29, False, jnp.float32),
    ],
)
def test_decode_over_wrapped_ring_buffer(t, kv_heads, window, sinks, dtype):
    b, n, h, p = 2, 4, 24, 16
    q_pos, kv_pos = _ring_cache(b, window, t)
    slots = kv_pos.shape[1]
    q, k, v, sink_logits, _ = random_inputs(
        1, b=b, t=t, s=slots, n=n, k=kv_heads, h=h, p=p, dtype=dtype, sinks=sinks
    )
    kw = dict(
        sinks=sink_logits,
        sliding_window=window,
        q_positions=q_pos,
        kv_positions=kv_pos,
    )
    # The ring really is unsorted and the window really cuts it.
    assert np.any(np.diff(np.asarray(kv_pos[0])) < 0)
    mask = visibility_mask(q_pos, kv_pos, causal=True, sliding_window=window)
    assert 0 < int(mask[0, -1].sum()) < slots
    got = jax.jit(lambda q, k, v: _pallas(q, k, v, **kw, block_sizes=BLOCKS))(q, k, v)
    want = jax.jit(lambda q, k, v: attention_reference(q, k, v, **kw))(q, k, v)
    assert_close(got, want, rtol(dtype), "decode")


def test_decode_rows_with_nothing_visible_are_zero():
    # A cache with no slot at or before the query and no sink: the reference gives 0, not NaN.
    b, t, n, h, p = 1, 2, 2, 24, 16
    q = jnp.ones((b, t, n, h))
    k = jnp.ones((b, 16, 1, h))
    v = jnp.ones((b, 16, 1, p))
    q_pos = jnp.array([[3, 40]], jnp.int32)
    kv_pos = jnp.where(jnp.arange(16) < 8, 10 + jnp.arange(16), -1)[None].astype(jnp.int32)
    kw = dict(sliding_window=8, q_positions=q_pos, kv_positions=kv_pos)
    got = jax.jit(lambda q, k, v: _pallas(q, k, v, **kw, block_sizes=BLOCKS))(q, k, v)
    want = jax.jit(lambda q, k, v: attention_reference(q, k, v, **kw))(q, k, v)
    assert_close(got, want, 1e-6, "empty rows")
    assert float(jnp.max(jnp.abs(got[:, 0]))) == 0.0


def test_decode_gradient_is_not_implemented():
    q = jnp.ones((1, 1, 2, 24))
    k = jnp.ones((1, 16, 1, 24))
    v = jnp.ones((1, 16, 1, 16))
    pos = dict(q_positions=jnp.array([[5]]), kv_positions=jnp.arange(16)[None])

    def loss(q):
        return _pallas(q, k, v, **pos, block_sizes=BLOCKS).sum()

    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(loss)(q)


@pytest.mark.parametrize("window", [None, 129])
def test_grid_visits_only_window_blocks(window):
    """The helpers that size the kernels' grids and loop bounds cover exactly the visible blocks,
    and for SWA that is O(T * W), far fewer than all blocks."""
    t = s = 2048
    bq = bk = 128
    kw = dict(block_q=bq, block_kv=bk, q_len=t, kv_len=s, causal=True, window=window)
    nq, nk = t // bq, s // bk
    lo, hi = kv_block_bounds(np.arange(nq), **kw, xp=np)
    visited = int(np.sum(hi - lo + 1))
    # Brute force: a block pair is needed iff some (query, key) pair in it is visible.
    pos = jnp.arange(t)[None]
    vis = visibility_mask(pos, pos, causal=True, sliding_window=window)[0]
    needed = np.asarray(vis).reshape(nq, bq, nk, bk).any(axis=(1, 3))  # [nq, nk]
    for qi in range(nq):
        assert np.flatnonzero(needed[qi]).tolist() == list(range(lo[qi], hi[qi] + 1))
    steps = num_kv_steps(**kw)
    if window is None:
        assert visited == nq * (nq + 1) // 2  # causal triangle
    else:
        assert steps == 2  # (bq + W - 1) / bk rounded up: the grid's kv axis is 2 blocks wide
        assert visited < 2 * nq < nq * nk
    # The dk/dv kernel's q-block bounds are the transpose of the same relation.
    qlo, qhi = q_block_bounds(np.arange(nk), **kw, xp=np)
    for ki in range(nk):
        assert np.flatnonzero(needed[:, ki]).tolist() == list(range(qlo[ki], qhi[ki] + 1))


def test_block_bounds_with_padding_and_offsets():
    # T < S (queries are the last T keys), T and S not tile multiples, window not tile aligned.
    t, s, bq, bk, window = 37, 53, 16, 16, 13
    kw = dict(block_q=bq, block_kv=bk, q_len=t, kv_len=s, causal=True, window=window)
    vis = np.asarray(
        visibility_mask(
            jnp.arange(s - t, s)[None], jnp.arange(s)[None], causal=True, sliding_window=window
        )[0]
    )
    vis = np.pad(vis, ((0, (-t) % bq), (0, (-s) % bk)))
    needed = vis.reshape(-1, bq, vis.shape[1] // bk, bk).any(axis=(1, 3))
    lo, hi = kv_block_bounds(np.arange(needed.shape[0]), **kw, xp=np)
    for qi in range(needed.shape[0]):
        assert np.flatnonzero(needed[qi]).tolist() == list(range(lo[qi], hi[qi] + 1))


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(block_q=12)
    assert BlockSizes().block_kv == 128


def test_lowers_for_tpu_mosaic():
    """The Pallas TPU kernels lower to Mosaic TPU from this host: one kernel forward, three for
    forward + backward (forward, dq, dk/dv), at the model's head dims with window and sinks."""
    q = jax.ShapeDtypeStruct((1, 1024, 8, 192), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1024, 2, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((8,), jnp.float32)

    def fwd(q, k, v, s):
        return flash.flash_attention(q, k, v, sinks=s, sliding_window=129, interpret=False)

    def grads(q, k, v, s):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(
            q, k, v, s
        )

    for fn, kernels in ((fwd, 1), (grads, 3)):
        text = jax.jit(fn).trace(q, k, v, s).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == kernels, fn.__name__
