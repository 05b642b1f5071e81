"""Mosaic GPU kernels (``kernel="mgpu"``: ``pallas_kernels.flash_mgpu*``, forward, backward,
decode) vs the fp32 reference.

On CPU the kernels run in the Mosaic GPU interpreter (warpgroups as threads, simulated SMEM, TMA and
barriers; the few ops the interpreter lacks are swapped for jnp on the same refs, see
``flash_mgpu_common``'s docstring), and the compiled path is checked by lowering it for "cuda" from
the CPU host. With ``MIMO_PALLAS_INTERPRET=0`` on a Hopper GPU the same tests run the compiled
kernels. The interpreter is slow, so shapes are small: 128-row CTAs, 64-key blocks, head dims 64
(192 / 128 once), and every kernel runs in its own dispatch (no outer ``jax.jit``): with several
interpreted kernels in one XLA program the jax 0.10 interpreter can deadlock on a 2-core host.
"""

import dataclasses
import re
import threading

import jax
import jax.numpy as jnp
import pytest
from attention_testing import random_inputs, rtol
from numerics_testing import assert_close

from pallas_kernels import (
    attention,
    attention_reference,
    default_interpret,
    default_kernel,
    flash_mgpu,
    flash_mgpu_decode,
)
from pallas_kernels.flash_common import BlockSizes
from pallas_kernels.flash_mgpu_common import MgpuBlockSizes
from pallas_kernels.reference import visibility_mask

# The logsumexp is accumulated in fp32 from the same 16-bit products as the reference's.
LSE_RTOL = 1e-5


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return getattr(jax.devices()[0], "compute_capability", "") in ("9.0", "9.0a")


INTERPRET = default_interpret()
if not INTERPRET and not _on_hopper():
    pytest.skip(
        "compiled Mosaic GPU kernels need an sm90 GPU; on CPU the interpreter runs them",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def _full_precision_reference():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _cache_interpreter_threads():
    """Test speed only: the jax 0.10 GPU interpreter compiles each CTA's thread bodies afresh
    (``thread_map._run_jaxpr`` builds a new ``jax.jit`` per call, ~5 s per CTA on 2 cores). Cache
    the executable per (thread jaxpr, thread id) so the CTAs of a kernel share it; each thread
    keeps its own executable because a shared one deadlocks the concurrent threads. Semantics are
    unchanged; without the private hook (other jax versions) nothing is patched."""
    if not INTERPRET:
        yield
        return
    try:
        from jax._src import core as jax_core  # noqa: PLC0415
        from jax._src.pallas.mosaic.interpret import thread_map  # noqa: PLC0415
    except ImportError:
        yield
        return
    original = getattr(thread_map, "_run_jaxpr", None)
    if original is None:
        yield
        return
    cache, lock = {}, threading.Lock()

    def run(jaxpr, consts, *args):
        jax_core.eval_jaxpr(jaxpr, consts, *args)

    def run_cached(jaxpr, consts, *args):
        key = (jaxpr, int(args[0]))  # args[0] is the thread id
        with lock:
            exe = cache.get(key)
        if exe is None:
            exe = jax.jit(run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()
            with lock:
                cache[key] = exe
        exe(consts, *args)

    thread_map._run_jaxpr = run_cached
    try:
        yield
    finally:
        thread_map._run_jaxpr = original


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:
        # The interpreter keeps global state that a failed kernel leaves inconsistent.
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415

        interpret_pallas_call.reset_gpu_interpret_mode_state()


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 1
    t: int = 150  # not a multiple of the 128-row CTA
    s: int | None = None  # None: S = T
    n: int = 2
    k: int = 1
    h: int = 64
    p: int = 64
    window: int | None = 40
    sinks: bool = True
    causal: bool = True
    dtype: type = jnp.bfloat16


def _inputs(c: Case, seed=0):
    s = c.t if c.s is None else c.s
    return random_inputs(
        seed, b=c.b, t=c.t, s=s, n=c.n, k=c.k, h=c.h, p=c.p, dtype=c.dtype, sinks=c.sinks
    )


def _mgpu(q, k, v, **kw):
    """The front door with the Mosaic GPU kernels (interpreted on CPU)."""
    return attention(q, k, v, **kw, implementation="pallas", kernel="mgpu", interpret=INTERPRET)


def _reference_lse(q, k, sinks, c: Case):
    """[B, N, T] natural-log logsumexp of the scaled visible logits and the sink, in fp32."""
    t, s = q.shape[1], k.shape[1]
    g = c.n // c.k
    kf = jnp.repeat(k.astype(jnp.float32), g, axis=2)  # [B, S, N, H]
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kf) * c.h**-0.5
    pos = jnp.arange(s)[None]
    mask = visibility_mask(pos[:, s - t :], pos, causal=c.causal, sliding_window=c.window)
    logits = jnp.where(mask[:, None], logits, -jnp.inf)  # [B, N, T, S]
    if sinks is not None:
        sink = jnp.broadcast_to(sinks[None, :, None, None], (*logits.shape[:3], 1))
        logits = jnp.concatenate([logits, sink], axis=-1)
    return jax.nn.logsumexp(logits, axis=-1)


CASES = {
    # Window of 40 < one 64-key block: CTAs skip blocks on both sides; GQA G = 2.
    "swa_sinks_gqa": Case(),
    "global_causal_no_sinks_mha_t_lt_s": Case(t=70, s=200, n=2, k=2, window=None, sinks=False),
    "model_head_dims_192_128_non_causal_f16": Case(
        t=64, n=3, h=192, p=128, window=20, causal=False, dtype=jnp.float16
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_lse_match_reference(name):
    c = CASES[name]
    q, k, v, sinks, _ = _inputs(c)
    kw = dict(sliding_window=c.window, causal=c.causal)
    o, lse = jax.jit(
        lambda q, k, v, sinks: flash_mgpu.flash_forward_mgpu(
            q, k, v, sinks, **kw, interpret=INTERPRET
        )
    )(q, k, v, sinks)
    want = jax.jit(lambda q, k, v, sinks: attention_reference(q, k, v, sinks=sinks, **kw))(
        q, k, v, sinks
    )
    assert o.dtype == q.dtype
    assert_close(o, want, rtol(c.dtype), f"{name} out")
    assert_close(lse, _reference_lse(q, k, sinks, c), LSE_RTOL, f"{name} lse")


BWD_CASES = {
    # SWA (window 40 < one block) with sinks, GQA G = 2, batch 2, T = 150 not a CTA multiple.
    "swa_sinks_gqa_batch2": Case(b=2),
    # Global causal, no sinks, T < S (dk/dv CTAs whose keys only some q blocks see), H != P.
    "global_no_sinks_t_lt_s_h128_p64": Case(t=70, s=130, n=2, k=1, h=128, window=None, sinks=False),
    # Non-causal sliding window (keys on both sides), f16, MHA.
    "swa_non_causal_f16_sinks": Case(t=100, n=2, k=2, window=30, causal=False, dtype=jnp.float16),
}


@pytest.mark.parametrize("name", list(BWD_CASES))
def test_gradients_match_reference(name):
    """``attention(kernel="mgpu")``: Mosaic GPU forward and backward (dq, dk/dv kernels, dsinks
    from lse) through the custom VJP, vs the fp32 reference's gradients."""
    c = BWD_CASES[name]
    q, k, v, sinks, ct = _inputs(c, seed=1)
    kw = dict(sliding_window=c.window, causal=c.causal)

    def mgpu(q, k, v, sinks):
        return _mgpu(q, k, v, sinks=sinks, **kw)

    def reference(q, k, v, sinks):
        return attention_reference(q, k, v, sinks=sinks, **kw)

    # No outer jit: each kernel is its own dispatch (see the module docstring).
    o, vjp = jax.vjp(mgpu, q, k, v, sinks)
    got = (o, *vjp(ct))
    want = jax.jit(lambda: (lambda o, f: (o, *f(ct)))(*jax.vjp(reference, q, k, v, sinks)))()
    for label, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want, strict=True):
        if w is None:
            assert g is None, f"{name}: dsinks without sinks"
            continue
        assert g.dtype == w.dtype, f"{name} {label}: dtype {g.dtype} != {w.dtype}"
        assert_close(g, w, rtol(c.dtype), f"{name} {label}")


def _ring_cache(b, slots, ends, seed=2):
    """Slot positions of a ring buffer of ``slots`` entries after writing positions
    0 .. end - 1 of each batch row (several laps), plus one emptied slot.

    Returns:
      int32 [B, S] positions (-1 = empty).
    """
    slot = jnp.arange(slots)[None]  # [1, S]
    end = jnp.asarray(ends)[:, None]  # [B, 1]
    newest = end - 1 - (end - 1 - slot) % slots  # position held by each slot
    pos = jnp.where(newest >= 0, newest, -1).astype(jnp.int32)
    return pos.at[b - 1, seed].set(-1)


DECODE_CASES = {
    # T = 3 verify queries, window 40 in a ring of 108 slots (2 blocks) that wrapped ~4 laps.
    "swa_sinks_verify_wrapped": dict(t=3, window=40, sinks=True, ends=(500, 333), splits=2),
    # Plain decode (T = 1), global attention over a half-filled cache, no sinks, MQA G = 4.
    "global_decode_half_full": dict(t=1, window=None, sinks=False, ends=(60, 9), splits=None),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_ring_buffer_matches_reference(name):
    d = DECODE_CASES[name]
    b, t, n, kv_heads, h, p, slots = 2, d["t"], 4, 2 if d["sinks"] else 1, 64, 128, 108
    q, k, v, sinks, _ = random_inputs(
        3, b=b, t=t, s=slots, n=n, k=kv_heads, h=h, p=p, dtype=jnp.bfloat16, sinks=d["sinks"]
    )
    kv_pos = _ring_cache(b, slots, d["ends"])
    q_pos = (jnp.asarray(d["ends"])[:, None] - t + jnp.arange(t)[None]).astype(jnp.int32)
    if d["window"] is None:
        # A half-filled cache: slots past the newest position are empty.
        kv_pos = jnp.where(jnp.arange(slots)[None] < jnp.asarray(d["ends"])[:, None], kv_pos, -1)
    kw = dict(sinks=sinks, sliding_window=d["window"], q_positions=q_pos, kv_positions=kv_pos)
    if d["splits"] is None:
        # The front door: positions and kernel="mgpu" dispatch to flash_mgpu_decode.
        got = _mgpu(q, k, v, **kw)
    else:
        got = flash_mgpu_decode.decode_attention_mgpu(
            q,
            k,
            v,
            q_pos,
            kv_pos,
            sinks=sinks,
            sliding_window=d["window"],
            num_splits=d["splits"],
            interpret=INTERPRET,
        )
    want = jax.jit(lambda: attention_reference(q, k, v, **kw))()
    assert got.dtype == q.dtype
    assert_close(got, want, rtol(q.dtype), f"{name} decode")


def test_kernel_and_interpret_selection(monkeypatch):
    # The default kernel: Mosaic GPU on GPU backends, the Pallas TPU kernels elsewhere.
    for backend, kernel in (("gpu", "mgpu"), ("cuda", "mgpu"), ("tpu", "tpu"), ("cpu", "tpu")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert default_kernel() == kernel, backend
    # Interpretation: MIMO_PALLAS_INTERPRET wins, else only on CPU; nonsense is refused.
    monkeypatch.setenv("MIMO_PALLAS_INTERPRET", "1")
    assert default_interpret()
    monkeypatch.setenv("MIMO_PALLAS_INTERPRET", "0")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not default_interpret()
    monkeypatch.delenv("MIMO_PALLAS_INTERPRET")
    assert default_interpret()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not default_interpret()
    monkeypatch.setenv("MIMO_PALLAS_INTERPRET", "maybe")
    with pytest.raises(ValueError, match="MIMO_PALLAS_INTERPRET"):
        default_interpret()
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        attention(q, kv, kv, implementation="pallas", kernel="triton")
    # Kernel arguments given to the XLA path are refused, not silently ignored.
    with pytest.raises(ValueError, match="kernel, interpret only apply to implementation='pallas'"):
        attention(q, kv, kv, implementation="xla", kernel="mgpu", interpret=True)


def _model_shapes(t, dtype, sinks):
    q = jax.ShapeDtypeStruct((1, t, 64, 192), dtype)
    k = jax.ShapeDtypeStruct((1, t, 8, 192), dtype)
    v = jax.ShapeDtypeStruct((1, t, 8, 128), dtype)
    s = jax.ShapeDtypeStruct((64,), jnp.float32) if sinks else None
    return q, k, v, s


def _cuda_kernels(fn, *args):
    """(number of Mosaic GPU custom calls, lowered text) of ``fn`` lowered for "cuda"."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return len(re.findall(r"custom_call @mosaic_gpu", text)), text


@pytest.mark.parametrize(
    "name, t, window, sinks, dtype",
    [
        ("swa_sinks_real_dims", 4096, 129, True, jnp.bfloat16),
        ("global_f16_t_not_multiple", 1000, None, False, jnp.float16),
    ],
)
def test_forward_and_backward_lower_for_cuda(name, t, window, sinks, dtype):
    """The compiled path (wgmma on swizzled SMEM, WGMMA layouts, TMA, warpgroup specialisation)
    lowers to Mosaic GPU custom calls for "cuda" from any host: forward, dq, dk/dv."""
    q, k, v, s = _model_shapes(t, dtype, sinks)

    def fwd(q, k, v, s):
        return flash_mgpu.flash_forward_mgpu(q, k, v, s, sliding_window=window, interpret=False)

    assert _cuda_kernels(fwd, q, k, v, s)[0] == 1, f"{name}: no Mosaic GPU forward"

    def loss(q, k, v, s):
        o = attention(
            q, k, v, sinks=s, sliding_window=window, implementation="pallas", kernel="mgpu",
            interpret=False,
        )  # fmt: skip
        return jnp.sum(o.astype(jnp.float32))

    # Forward + dq + dk/dv kernels, and no Triton call anywhere.
    count, text = _cuda_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, s)
    assert count == 3, f"{name}: {count} Mosaic GPU kernels, expected forward, dq and dk/dv"
    assert "triton" not in text.lower(), f"{name}: Triton kernel in the mgpu backward"


def test_decode_lowers_for_cuda():
    q = jax.ShapeDtypeStruct((2, 4, 64, 192), jnp.bfloat16)  # verify with 3 drafts, G * T = 32
    k = jax.ShapeDtypeStruct((2, 132, 8, 192), jnp.bfloat16)  # ring of W + 4 slots
    v = jax.ShapeDtypeStruct((2, 132, 8, 128), jnp.bfloat16)
    pos_q = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    pos_kv = jax.ShapeDtypeStruct((2, 132), jnp.int32)
    s = jax.ShapeDtypeStruct((64,), jnp.float32)

    def f(q, k, v, pq, pk, s):
        return attention(
            q,
            k,
            v,
            sinks=s,
            sliding_window=128,
            q_positions=pq,
            kv_positions=pk,
            implementation="pallas",
            kernel="mgpu",
            interpret=False,
        )

    count, text = _cuda_kernels(f, q, k, v, pos_q, pos_kv, s)
    assert count == 1 and "triton" not in text.lower()


def test_rejects_unsupported_inputs():
    q = jnp.zeros((1, 64, 2, 48), jnp.bfloat16)
    kv = jnp.zeros((1, 64, 1, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"multiples of 64.*H=q.shape\[-1\]=48"):
        flash_mgpu.flash_forward_mgpu(q, kv, kv, interpret=True)
    with pytest.raises(ValueError, match="multiples of 64"):
        _mgpu(q, kv, kv)
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    kv = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="q.dtype=float32"):
        _mgpu(q, kv, kv)
    pos = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(ValueError, match="bf16 or all f16"):
        _mgpu(q, kv, kv, q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match="MgpuBlockSizes"):
        _mgpu(
            q.astype(jnp.bfloat16),
            kv.astype(jnp.bfloat16),
            kv.astype(jnp.bfloat16),
            block_sizes=BlockSizes.uniform(32),
        )
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 64"):
        MgpuBlockSizes(block_q=32)
