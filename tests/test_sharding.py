"""Meshes, rule presets, sharded init / train step / decoding, expert parallelism.

Runs on 8 fake CPU devices (tests/conftest.py). Everything sharded is compared with the same
computation on one device: fp32, 1e-5.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import process_testing
import pytest
from flax import nnx

import mimo_jax
from configs.base import base_config
from mimo_jax import axes as ax
from mimo_jax import sharding as sh
from mimo_jax import train
from mimo_jax.model import MiMoV2Flash

CFG = mimo_jax.tiny(
    num_layers=3,  # dense global layer 0, then 2 SWA MoE layers run as a scanned stack
    vocab_size=64,
    embed_dim=32,
    mlp_dim=48,
    moe_mlp_dim=16,
    num_heads=4,
    num_kv_heads=2,
    swa_num_kv_heads=2,
    head_dim=24,
    v_head_dim=8,
    sliding_window=5,
    num_experts=8,
    num_mtp_layers=1,
    max_position_embeddings=64,
)
TOL = 1e-5


def _train_config():
    tc = base_config().train
    tc.steps, tc.warmup_steps, tc.lr = 10, 1, 1e-2
    # No clipping: after one step Adam's first moment is exactly (1 - b1) * gradient, so
    # comparing optimizer states compares gradients tensor by tensor.
    tc.grad_clip = 1e9
    return tc


TC = _train_config()
IDS = np.asarray(jax.random.randint(jax.random.key(1), (8, 13), 0, CFG.vocab_size))

# What each preset must do to each kind of parameter: (mesh axes per logical dim), written out
# per parameter kind independently of sharding.RULES.
_ALL, _NOT_DATA = ("data", "fsdp", "expert", "tensor"), ("fsdp", "expert", "tensor")
EXPECTED = {
    # kind: {preset: spec}
    "embedding": {"fsdp": (None, _NOT_DATA), "fsdp_ep": (None, _NOT_DATA),
                  "tp_ep": ("tensor", "fsdp"), "decode": ("tensor", None)},
    "lm_head": {"fsdp": (_NOT_DATA, None), "fsdp_ep": (_NOT_DATA, None),
                "tp_ep": ("fsdp", "tensor"), "decode": (None, "tensor")},
    "q_proj": {"fsdp": (_NOT_DATA, None, None), "fsdp_ep": (_NOT_DATA, None, None),
               "tp_ep": ("fsdp", "tensor", None), "decode": (None, "tensor", None)},
    "o_proj": {"fsdp": (None, None, _NOT_DATA), "fsdp_ep": (None, None, _NOT_DATA),
               "tp_ep": ("tensor", None, "fsdp"), "decode": ("tensor", None, None)},
    "sinks": {"fsdp": (None,), "fsdp_ep": (None,), "tp_ep": ("tensor",), "decode": ("tensor",)},
    "scale": {p: (None,) for p in sh.RULES},
    "gate_proj": {"fsdp": (_NOT_DATA, None), "fsdp_ep": (_NOT_DATA, None),
                  "tp_ep": ("fsdp", "tensor"), "decode": (None, "tensor")},
    "down_proj": {"fsdp": (None, _NOT_DATA), "fsdp_ep": (None, _NOT_DATA),
                  "tp_ep": ("tensor", "fsdp"), "decode": ("tensor", None)},
    "eh_proj": {"fsdp": (None, _NOT_DATA), "fsdp_ep": (None, _NOT_DATA),
                "tp_ep": ("tensor", "fsdp"), "decode": ("tensor", None)},
    "router": {"fsdp": (_NOT_DATA, None), "fsdp_ep": (_NOT_DATA, None),
               "tp_ep": ("fsdp", None), "decode": (None, None)},
    "bias": {p: (None,) for p in sh.RULES},
    "wi_gate": {"fsdp": (None, _NOT_DATA, None),
                "fsdp_ep": ("expert", ("fsdp", "tensor"), None),
                "tp_ep": ("expert", "fsdp", "tensor"),
                "decode": (("fsdp", "expert"), None, "tensor")},
    "wo": {"fsdp": (None, None, _NOT_DATA), "fsdp_ep": ("expert", None, ("fsdp", "tensor")),
           "tp_ep": ("expert", "tensor", "fsdp"), "decode": (("fsdp", "expert"), "tensor", None)},
}  # fmt: skip
EXPECTED["k_proj"] = EXPECTED["v_proj"] = EXPECTED["q_proj"]
EXPECTED["up_proj"] = EXPECTED["gate_proj"]
EXPECTED["wi_up"] = EXPECTED["wi_gate"]


def _kind(path: tuple) -> str:
    names = [str(p) for p in path]
    for name in reversed(names):
        if name in EXPECTED:
            return name
    if names[-2] == "router":
        return "router" if names[-1] == "kernel" else "bias"
    raise KeyError(f"no expected spec for parameter {'.'.join(names)}")


def _normalize(spec, mesh) -> tuple:
    """Spec as tuples of mesh axes, without size-1 axes (they do not split anything)."""
    out = [() if a is None else ((a,) if isinstance(a, str) else tuple(a)) for a in spec]
    out = [tuple(a for a in axes if mesh.shape[a] > 1) for axes in out]
    while out and out[-1] == ():
        out.pop()
    return tuple(out)


def _check_specs(tree, preset: str) -> int:
    """Asserts the sharding of every array under ``tree`` (model or optimizer); returns count."""
    n = 0
    for path, var in nnx.to_flat_state(nnx.state(tree)):
        value = var.get_value()
        if value.ndim == 0:  # step counters
            continue
        want = EXPECTED[_kind(path)][preset]
        want = (None,) * (value.ndim - len(want)) + want  # scanned: the leading layers axis
        got = _normalize(value.sharding.spec, value.sharding.mesh)
        assert got == _normalize(want, value.sharding.mesh), (
            f"{preset} {'.'.join(map(str, path))}: {got} != {want}"
        )
        n += 1
    return n


def _build(cfg):
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    return model, train.make_optimizer(model, TC)


@pytest.fixture(scope="module")
def reference():
    """Single device, no mesh, ``ragged`` MoE: initial state, logits, one train step, greedy
    decoding of the stepped model."""
    model, opt = nnx.jit(lambda: _build(CFG))()
    init = jax.tree.map(np.asarray, nnx.state((model, opt)))
    logits = jax.jit(lambda m: m(IDS).logits)(model)
    gd, state = nnx.split((model, opt))
    step = train.make_train_step(gd, CFG, TC)
    new_state, metrics = step(state, jnp.asarray(IDS)[None])
    tokens = mimo_jax.generate(nnx.merge(gd, new_state)[0], IDS[:, :7], max_new_tokens=5).tokens
    return init, logits, new_state, metrics, np.asarray(tokens)


# (preset, mesh, MTP drafts when decoding). Every preset runs on (1, 2, 2, 2), where fsdp,
# expert and tensor are all 2-way; the expert-parallel presets also on (2, 1, 4, 1), which adds
# a data axis and 4-way experts. (8-way experts, one per device: the expert-parallel tests
# below.) Each preset decodes speculatively once (1 draft: greedy output must not change).
CASES = [
    ("fsdp", (1, 2, 2, 2), 1),
    ("fsdp_ep", (1, 2, 2, 2), 0),
    ("fsdp_ep", (2, 1, 4, 1), 1),
    ("tp_ep", (1, 2, 2, 2), 1),
    ("tp_ep", (2, 1, 4, 1), 0),
    ("decode", (1, 2, 2, 2), 1),
]


@pytest.mark.parametrize(
    ("preset", "shape", "drafts"), CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s, _ in CASES]
)
def test_sharded_equals_single_device(reference, preset, shape, drafts):
    """Forward logits, one training step (loss, gradients, updated parameters and optimizer
    state), and greedy decoding, sharded with ``expert_parallel`` MoE vs one device with
    ``ragged``. (Sharded initialisation itself: ``test_checkpoint_restores_onto_another_mesh``.)"""
    init, ref_logits, ref_state, ref_metrics, ref_tokens = reference
    cfg = dataclasses.replace(CFG, moe_impl="expert_parallel")
    with sh.use_mesh(sh.make_mesh(shape), preset):
        abstract = nnx.eval_shape(lambda: _build(cfg))
        shardings = sh.state_shardings(abstract)
        model, opt = nnx.merge(nnx.graphdef(abstract), jax.device_put(init, shardings))
        # Parameters, correction biases and both Adam moments carry the preset's layout.
        assert _check_specs(model, preset) > 20
        assert _check_specs(opt.opt_state, preset) > 40
        logits = nnx.jit(lambda m: m(IDS).logits)(model)
        gd, state = nnx.split((model, opt))
        step = train.make_train_step(gd, cfg, TC, shardings)
        new_state, metrics = step(state, sh.put_batch(IDS[None], batch_dim=1))
        assert jax.tree.map(lambda x: x.sharding, new_state) == shardings
        new_model = nnx.merge(gd, new_state)[0]
        tokens = mimo_jax.generate(new_model, IDS[:, :7], max_new_tokens=5,
                                   num_draft_tokens=drafts).tokens  # fmt: skip

    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    for k in ("ce", "mtp_ce_0", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=TOL, rtol=0, err_msg=k)
    ours, theirs = nnx.to_flat_state(new_state), dict(nnx.to_flat_state(ref_state))
    for path, var in ours:  # parameters, Adam moments (= gradients), step, correction biases
        a, b = np.asarray(var.get_value()), np.asarray(theirs[path].get_value())
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=".".join(map(str, path)))
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{drafts} drafts")


# ---------------------------------------------------------------------------------------------
# Expert parallelism on its own.


def _dense_reference(x, weights, idx, wg, wu, wo):
    """Every expert on every token, one-hot combine. x [N, D] -> [N, D]."""
    gate = jnp.einsum("nd,edm->nem", x, wg)
    out = jnp.einsum("nem,emd->ned", jax.nn.silu(gate) * jnp.einsum("nd,edm->nem", x, wu), wo)
    combine = jnp.sum(jax.nn.one_hot(idx, wg.shape[0]) * weights[..., None], axis=1)  # [N, E]
    return jnp.einsum("ned,ne->nd", out, combine)


def _skewed_inputs(n=40, e=8, k=2, d=16, m=12):
    keys = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(keys[0], (n, d))
    ws = [jax.random.normal(keys[i], s) * 0.3 for i, s in
          zip((1, 2, 3), ((e, d, m), (e, d, m), (e, m, d)), strict=True)]  # fmt: skip
    idx = jax.random.randint(keys[4], (n, k), 0, e)
    idx = idx.at[:, 0].set(3).at[: n // 2, 1].set(5)  # expert 3 gets every token: overloaded
    idx = jnp.where(idx[:, :1] == idx[:, 1:], idx.at[:, 1].set(0), idx)  # distinct per token
    weights = jax.random.uniform(keys[5], (n, k))
    return x, weights, idx.astype(jnp.int32), ws


@pytest.mark.parametrize(("shape", "preset"), [((1, 1, 8, 1), "fsdp_ep"), ((2, 1, 4, 1), "tp_ep"),
                                               ((1, 2, 2, 2), "decode")])  # fmt: skip
def test_expert_parallel_equals_dense_and_ragged(shape, preset):
    """Module level, skewed routing: one expert receives every token; also dispatched in token
    chunks."""
    cfg = dataclasses.replace(CFG, moe_impl="dense")
    moe = mimo_jax.moe.MoE(cfg, rngs=nnx.Rngs(0))
    bias = jnp.zeros((cfg.num_experts,)).at[3].set(10.0)  # the router picks expert 3 always
    moe.router.bias.set_value(bias)
    gd, state = nnx.split(moe)
    x = jax.random.normal(jax.random.key(4), (4, 10, cfg.embed_dim))

    def run(impl, token_chunk=0):
        g = nnx.graphdef(nnx.eval_shape(lambda: mimo_jax.moe.MoE(dataclasses.replace(
            cfg, moe_impl=impl, moe_token_chunk=token_chunk), rngs=nnx.Rngs(0))))  # fmt: skip

        def loss(state, x):
            y, aux = nnx.merge(g, state)(x)
            return jnp.sum(jnp.sin(y)), (y, aux["expert_load"])

        (_, (y, load)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(state, x)
        return y, load, grads

    y_dense, load, g_dense = run("dense")
    assert load[3] == x.shape[0] * x.shape[1]  # overloaded: every token
    y_ragged, _, g_ragged = run("ragged")
    with sh.use_mesh(sh.make_mesh(shape), preset):
        y_ep, _, g_ep = run("expert_parallel")
        # 40 tokens, 5 or 10 per device, dispatched 2 at a time (the 5 padded to 6).
        y_chunked, _, g_chunked = run("expert_parallel", token_chunk=2)
    for name, y, g in (("ragged", y_ragged, g_ragged), ("expert_parallel", y_ep, g_ep),
                       ("expert_parallel chunked", y_chunked, g_chunked)):  # fmt: skip
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, y_dense, atol=TOL, rtol=0, err_msg=name)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_dense), strict=True):
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


def _expected_drops(idx, shards, experts, cap):
    """Which assignments a capacity drops, by direct counting: device s holds the s-th block of
    tokens and fills each peer's slots in token order."""
    n, k = idx.shape
    per = n // shards
    keep = np.ones((n, k), bool)
    for s in range(shards):
        used = [0] * shards
        for t in range(s * per, (s + 1) * per):
            for j in range(k):
                dest = int(idx[t, j]) // (experts // shards)
                keep[t, j] = used[dest] < cap
                used[dest] += 1
    return keep


def test_expert_parallel_capacity_drops_and_reports():
    from mimo_jax.expert_parallel import capacity, expert_parallel_moe  # noqa: PLC0415
    from mimo_jax.moe import grouped_matmul  # noqa: PLC0415

    x, weights, idx, (wg, wu, wo) = _skewed_inputs()
    with sh.use_mesh(sh.make_mesh((1, 1, 8, 1)), "fsdp_ep"):
        for factor in (0.0, 1.0, 2.0):
            y, dropped = jax.jit(lambda x, w, f=factor: expert_parallel_moe(
                x, w, idx, wg, wu, wo, grouped_matmul=grouped_matmul, capacity_factor=f))(
                x, weights)  # fmt: skip
            cap = capacity(x.shape[0] // 8, 2, 8, factor)
            keep = _expected_drops(np.asarray(idx), 8, 8, cap)
            want = _dense_reference(x, jnp.where(keep, weights, 0), idx, wg, wu, wo)
            np.testing.assert_allclose(y, want, atol=TOL, rtol=0, err_msg=f"factor {factor}")
            np.testing.assert_allclose(dropped, 1 - keep.mean(), atol=1e-7)
            assert (factor == 0) == (float(dropped) == 0)  # the skew overflows any finite factor


# ---------------------------------------------------------------------------------------------
# Meshes and errors.


def test_make_mesh_fills_and_refuses():
    assert sh.make_mesh((1, 2, 1, 1)).devices.size == 2  # a prefix of the devices
    mesh = sh.make_mesh((2, -1, 1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 24 devices"):
        sh.make_mesh((2, 3, 4, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sh.make_mesh((-1, -1, 1, 1))
    with pytest.raises(ValueError, match="4 entries"):
        sh.make_mesh((2, 4))
    with pytest.raises(ValueError, match="not divisible by 3"):
        sh.make_mesh((3, -1, 1, 1))
    with pytest.raises(ValueError, match="unknown sharding preset 'zero3'"):
        sh.rules_for("zero3")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sh.rules_for({ax.EMBED: "model"})


@pytest.mark.parametrize(
    ("overrides", "shape", "preset", "message"),
    [
        (
            {"num_experts": 6},
            (1, 1, 8, 1),
            "fsdp_ep",
            r"wi_gate dim \d \('exp', size 6\).*'expert'",
        ),
        ({"num_kv_heads": 1}, (1, 2, 2, 2), "tp_ep", r"k_proj.* \('kv_heads', size 1\).*'tensor'"),
        ({"embed_dim": 36}, (1, 1, 8, 1), "fsdp", r"dim \d \('embed', size 36\).*'fsdp'"),
    ],
)
def test_indivisible_mesh_is_refused(overrides, shape, preset, message):
    cfg = dataclasses.replace(CFG, **overrides)
    with sh.use_mesh(sh.make_mesh(shape), preset), pytest.raises(ValueError, match=message):
        sh.create_model(cfg)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    from mimo_jax import checkpoint  # noqa: PLC0415

    with sh.use_mesh(sh.make_mesh((1, 1, 8, 1)), "fsdp_ep"):
        model, opt = sh.create_sharded(lambda: _build(CFG))  # initialised inside jit, sharded
        assert _check_specs(model, "fsdp_ep") > 20
        assert _check_specs(opt.opt_state, "fsdp_ep") > 40
        saver = checkpoint.Checkpointer(str(tmp_path))
        saver.save(7, model, opt)
        saver.close()
        saved = jax.tree.map(np.asarray, nnx.state((model, opt)))
    with sh.use_mesh(sh.make_mesh((1, 2, 2, 2)), "tp_ep"):
        other = dataclasses.replace(CFG, initializer_range=0.5)  # different values before restore
        model2, opt2 = sh.create_sharded(lambda: _build(other))
        loader = checkpoint.Checkpointer(str(tmp_path))
        assert loader.restore(model2, opt2) == 7
        loader.close()
    assert _check_specs(model2, "tp_ep") > 20
    assert _check_specs(opt2.opt_state, "tp_ep") > 40
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(nnx.state((model2, opt2))),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Multi-process.


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_process_training_equals_one_process(tmp_path):
    """``main.py`` under ``jax.distributed`` (2 processes x 2 CPU devices, localhost
    coordinator) trains, evaluates and samples like one process with 4 devices."""
    flags = ["--config=configs/debug.py", "--config.train.steps=3", "--config.train.log_every=1",
             "--config.train.eval_every=3", "--config.train.eval_batches=1",
             "--config.train.batch_size=4", "--config.train.seq_len=32",
             "--config.train.sample_len=4", "--config.data.max_bytes=200000",
             "--config.mesh.shape=(1,2,2,1)", "--config.mesh.rules=fsdp_ep"]  # fmt: skip
    port = process_testing.free_port()

    def launch(devices, workdir, *extra):
        return process_testing.launch(devices, ["main.py", *flags, f"--workdir={workdir}", *extra])

    multi = [launch(2, tmp_path / "multi", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}") for i in range(2)]  # fmt: skip
    single = launch(4, tmp_path / "single")
    for p in [*multi, single]:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
        assert "--- sample ---" in out
    a, b = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b, strict=True):
        for k in ("ce", "mtp_ce_0", "grad_norm"):
            np.testing.assert_allclose(ma[k], mb[k], atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(a[-1]["val_loss"], b[-1]["val_loss"], atol=1e-5, rtol=0)


def test_batch_not_divisible_by_mesh_is_refused(tmp_path):
    from configs import debug  # noqa: PLC0415

    config = debug.get_config()
    config.mesh.shape, config.train.batch_size = (1, -1, 1, 1), 4  # 8 batch shards
    config.data.max_bytes = 100_000
    with pytest.raises(ValueError, match=r"config.train.batch_size=4 must be divisible"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
