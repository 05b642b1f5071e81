"""Mosaic GPU forward kernel (``pallas_kernels.flash_mgpu``) vs the fp32 reference.

On CPU the kernel runs in the Mosaic GPU interpreter (warpgroups as threads, simulated SMEM, TMA and
barriers; the few ops the interpreter lacks are swapped for jnp on the same refs, see the module
docstring), and the compiled path is checked by lowering it for "cuda" from the CPU host. With
``MIMO_PALLAS_INTERPRET=0`` on a Hopper GPU the same tests run the compiled kernel. The interpreter
is slow (seconds per CTA), so shapes are small: 128-row CTAs, 64-key blocks, head dims 64.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash, flash_mgpu
from pallas_kernels.reference import visibility_mask

TOL = 2e-2  # bf16 / f16 inputs and output


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return getattr(jax.devices()[0], "compute_capability", "") in ("9.0", "9.0a")


INTERPRET = flash.resolve_interpret()
if not INTERPRET and not _on_hopper():
    pytest.skip(
        "compiled Mosaic GPU kernels need an sm90 GPU; on CPU the interpreter runs them",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def _full_precision_reference():
    with jax.default_matmul_precision("highest"):
        yield


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


CASES = {
    # Window of 40 < one 64-key block: CTAs skip blocks on both sides; GQA G = 2.
    "swa_sinks_gqa": Case(),
    "global_causal_no_sinks_mha_t_lt_s": Case(t=70, s=200, n=2, k=2, window=None, sinks=False),
    "swa_non_causal_f16": Case(t=100, window=30, causal=False, dtype=jnp.float16),
    "model_head_dims_192_128_mqa": Case(t=64, n=3, h=192, p=128, window=20),
}


def _inputs(c: Case, seed=0):
    s = c.t if c.s is None else c.s
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (c.b, c.t, c.n, c.h), jnp.float32).astype(c.dtype)
    k = jax.random.normal(ks[1], (c.b, s, c.k, c.h), jnp.float32).astype(c.dtype)
    v = jax.random.normal(ks[2], (c.b, s, c.k, c.p), jnp.float32).astype(c.dtype)
    sinks = jax.random.normal(ks[3], (c.n,), jnp.float32) if c.sinks else None
    ct = jax.random.normal(ks[4], (c.b, c.t, c.n, c.p), jnp.float32).astype(c.dtype)
    return q, k, v, sinks, ct


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


def _assert_close(got, want, tol, name):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    diff = float(np.max(np.abs(got - want)))
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.0e}"


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
    _assert_close(o, want, TOL, f"{name} out")
    _assert_close(lse, _reference_lse(q, k, sinks, c), TOL, f"{name} lse")


def test_mode_mgpu_forward_and_gradients():
    """``flash_attention(mode="mgpu")``: Mosaic GPU forward, "loop" backward on its lse."""
    c = Case(t=90, n=4, k=2, window=25)
    q, k, v, sinks, ct = _inputs(c, seed=1)

    def run(fn):
        def f(q, k, v, sinks):
            return fn(q, k, v, sinks=sinks, sliding_window=c.window)

        o, vjp = jax.vjp(f, q, k, v, sinks)
        return (o, *vjp(ct))

    blocks = flash.BlockSizes.uniform(32)
    got = jax.jit(
        lambda: run(
            lambda *a, **kw: flash.flash_attention(*a, **kw, block_sizes=blocks, mode="mgpu")
        )
    )()
    want = jax.jit(lambda: run(attention_reference))()
    for label, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want, strict=True):
        # dsinks sums T * B terms of O(1): absolute error grows with T.
        _assert_close(g, w, TOL if label != "dsinks" else 5e-2, f"mode=mgpu {label}")


def test_environment_selects_mgpu(monkeypatch):
    monkeypatch.setenv("MIMO_PALLAS_MODE", "mgpu")
    assert flash.resolve_mode() == "mgpu"
    monkeypatch.setenv("MIMO_PALLAS_MODE", "triton")
    with pytest.raises(ValueError, match="'mgpu'"):
        flash.resolve_mode()


@pytest.mark.parametrize(
    "name, t, window, sinks, dtype",
    [
        ("swa_sinks_real_dims", 4096, 129, True, jnp.bfloat16),
        ("global_f16_t_not_multiple", 1000, None, False, jnp.float16),
    ],
)
def test_lowers_for_cuda(name, t, window, sinks, dtype):
    """The compiled path (wgmma on swizzled SMEM, WGMMA layouts, TMA, warpgroup specialisation)
    lowers to a Mosaic GPU custom call for "cuda" from any host."""
    q = jax.ShapeDtypeStruct((1, t, 64, 192), dtype)
    k = jax.ShapeDtypeStruct((1, t, 8, 192), dtype)
    v = jax.ShapeDtypeStruct((1, t, 8, 128), dtype)
    s = jax.ShapeDtypeStruct((64,), jnp.float32) if sinks else None

    def f(q, k, v, s):
        return flash_mgpu.flash_forward_mgpu(q, k, v, s, sliding_window=window, interpret=False)

    text = jax.jit(f).trace(q, k, v, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, f"{name}: no Mosaic GPU custom call in the lowered module"


def test_rejects_unsupported_inputs():
    q = jnp.zeros((1, 64, 2, 48), jnp.bfloat16)
    kv = jnp.zeros((1, 64, 1, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 64"):
        flash_mgpu.flash_forward_mgpu(q, kv, kv, interpret=True)
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    kv = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bf16 or all f16"):
        flash_mgpu.flash_forward_mgpu(q, kv, kv, interpret=True)
    with pytest.raises(ValueError, match="multiples of 64"):
        flash_mgpu.MgpuBlockSizes(block_q=32)
