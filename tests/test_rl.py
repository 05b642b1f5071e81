"""The RL loop (``mimo_jax.post_training.rl``): its step sharded equals one device, a resumed run
follows the uninterrupted one, task errors stop it, bad config fields are named, the MTP loss
on rollout tokens trains the draft layers, and the old-policy pass agrees with the training
forward."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from configs import rl_tiny
from mimo_jax import checkpoint, train
from mimo_jax import sharding as sh
from mimo_jax.data import ByteTokenizer
from mimo_jax.post_training import rl, rl_step, rollout, tasks
from mimo_jax.sampling import Sampling

TOL = 1e-5
CFG = mimo_jax.tiny(
    num_layers=3, num_mtp_layers=1, initializer_range=0.1, max_position_embeddings=64
)
TASK = tasks.get_task("digit_reversal", min_digits=3, max_digits=4)
MIXTURE = tasks.Mixture({"digit_reversal": TASK})
SAMPLING = Sampling(1.0, 0, 1.0)


def _rl_config(**rl_fields):
    c = rl_tiny.get_config()
    c.rl.update(prompts_per_step=4, group_size=2, max_new_tokens=4, **rl_fields)
    return c.rl


def _rollout_batch(model, rc):
    """bf16 rollouts of ``model`` on 4 prompts x 2 samples, as the loop builds them (NumPy)."""
    roll = rollout.rollout_model(model, "bfloat16")
    ro, _ = rl._sample(roll, MIXTURE, ByteTokenizer(), rc, seed=0, step=0)
    rewards = np.arange(len(ro.prompts), dtype=np.float32) % 3  # distinct within each group
    return rl_step.build_batch(ro, rewards, rc)


def _build(cfg, rc):
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    return model, train.make_optimizer(model, rl._optimizer_fields(rc))


def _step(model, opt, cfg, rc, batch, shardings=None):
    gd, state = nnx.split((model, opt))
    step = train.make_train_step(
        gd, cfg, rl._optimizer_fields(rc), shardings,
        loss_fn=rl_step.make_loss_fn(cfg, rc, SAMPLING),
    )  # fmt: skip
    micro = {k: sh.put_batch(np.asarray(v)[None], batch_dim=1) for k, v in batch.items()}
    return step(state, micro)


@pytest.mark.parametrize(("preset", "shape"), [("fsdp_ep", (1, 2, 2, 2)), ("tp_ep", (2, 1, 4, 1))])
def test_sharded_rl_step_equals_one_device(preset, shape):
    """One RL update (replayed routing, importance weights, k3 KL, MTP loss) on a mesh of 8 CPU
    devices with expert-parallel MoE equals the single-device ragged update."""
    rc = _rl_config(importance_weights=True, kl_weight=0.1, mtp_loss_weight=0.5)
    model, opt = nnx.jit(lambda: _build(CFG, rc))()
    init = jax.tree.map(np.asarray, nnx.state((model, opt)))
    batch = _rollout_batch(model, rc)
    batch["ref_logp"] = np.asarray(batch["rollout_logp"]) - 0.05  # a reference that differs
    ref_state, ref_metrics = _step(model, opt, CFG, rc, batch)

    cfg = dataclasses.replace(CFG, moe_impl="expert_parallel")
    with sh.use_mesh(sh.make_mesh(shape), preset):
        abstract = nnx.eval_shape(lambda: _build(cfg, rc))
        shardings = sh.state_shardings(abstract)
        model, opt = nnx.merge(nnx.graphdef(abstract), jax.device_put(init, shardings))
        state, metrics = _step(model, opt, cfg, rc, batch, shardings)
        assert jax.tree.map(lambda x: x.sharding, state) == shardings
    assert float(ref_metrics["grad_norm"]) > 0
    for k in ("loss", "pg_loss", "kl_ref", "mtp_ce_0", "entropy", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=TOL, rtol=0, err_msg=k)
    theirs = dict(nnx.to_flat_state(ref_state))
    for path, var in nnx.to_flat_state(state):
        a, b = np.asarray(var.get_value()), np.asarray(theirs[path].get_value())
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=".".join(map(str, path)))


def test_mtp_loss_on_rollouts_trains_only_the_draft_layers():
    """mtp_loss_weight > 0 gives the MTP layers gradients from the rollout's responses and leaves
    every other gradient as it is without the MTP loss (the policy's objective is unchanged);
    with weight 0 the MTP layers get none."""
    grads = {}
    for w in (0.0, 0.3):
        rc = _rl_config(mtp_loss_weight=w)
        model, _ = _build(CFG, rc)
        batch = {k: jnp.asarray(v) for k, v in _rollout_batch(model, rc).items()}
        loss_fn = rl_step.make_loss_fn(CFG, rc, SAMPLING)
        grads[w] = nnx.grad(lambda m, b=batch, f=loss_fn: f(m, b)[0])(model)
    assert float(optax_norm(nnx.state(grads[0.0].mtp))) == 0.0
    assert float(optax_norm(nnx.state(grads[0.3].mtp))) > 0
    assert float(optax_norm(nnx.state(grads[0.0].layers))) > 0
    theirs = dict(nnx.to_flat_state(nnx.state(grads[0.0])))
    for path, var in nnx.to_flat_state(nnx.state(grads[0.3])):
        if path[0] != "mtp":
            np.testing.assert_allclose(
                np.asarray(var.get_value()), np.asarray(theirs[path].get_value()), atol=1e-7,
                rtol=1e-6, err_msg=".".join(map(str, path)),
            )  # fmt: skip


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_old_policy_pass_equals_training_forward():
    """The old-policy log-probs (a separate jitted pass with replay) equal the training loss's
    own: at the first of several updates every ratio is 1 and nothing is clipped."""
    rc = _rl_config(updates_per_step=2)
    model, opt = _build(CFG, rc)
    batch = {k: jnp.asarray(v) for k, v in _rollout_batch(model, rc).items()}
    batch["old_logp"] = rl_step.make_logp_fn(SAMPLING, replay=True)(model, batch)
    _, metrics = _step(model, opt, CFG, rc, batch)
    np.testing.assert_allclose(metrics["ratio_min"], 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics["ratio_max"], 1.0, atol=1e-6)
    assert float(metrics["clip_frac_high"]) == 0 and float(metrics["clip_frac_low"]) == 0


def _tiny_run_config(**rl_fields):
    c = rl_tiny.get_config()
    c.model.update(embed_dim=32, mlp_dim=48, moe_mlp_dim=24, num_experts=4, num_mtp_layers=1)
    c.train.update(steps=2, batch_size=4, log_every=1, eval_every=2, checkpoint_every=2)
    c.sft.update(num_examples=16, heldout_prompts=4)
    c.rl.update(
        steps=4, prompts_per_step=2, group_size=2, max_new_tokens=4, log_every=1,
        heldout_every=2, heldout_prompts=4, checkpoint_every=2, **rl_fields,
    )  # fmt: skip
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_resume_follows_the_uninterrupted_run(tmp_path):
    """4 RL steps in one go vs 2 steps, stop, resume to 4 (SFT warm-up included): the same
    parameters (1e-6) and the same rewards and losses at every step."""
    c = _tiny_run_config(kl_weight=0.05, importance_weights=True, num_draft_tokens=1)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    rl.run(c, full)
    c.rl.steps = 2
    rl.run(c, part)
    c.rl.steps = 4
    rl.run(c, part)
    a, b = _metrics(full), _metrics(part)
    for s in (1, 2, 3, 4):
        for k in ("reward_mean", "loss", "pg_loss", "kl_ref", "entropy", "grad_norm"):
            np.testing.assert_allclose(b[s][k], a[s][k], atol=1e-6, rtol=0, err_msg=f"{k}@{s}")
    assert "heldout_success" in b[4] and "r3_kl_replay" in b[4]
    pa = nnx.state(checkpoint.load_model(full), nnx.Param)
    pb = nnx.state(checkpoint.load_model(part), nnx.Param)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


class _BrokenTask(tasks.DigitReversal):
    def reward(self, prompt, completion):
        return float("nan")


def test_task_error_names_task_and_prompt():
    model, _ = _build(CFG, _rl_config())
    ro, _ = rl._sample(model, MIXTURE, ByteTokenizer(), _rl_config(), seed=0, step=0)
    with pytest.raises(ValueError, match=r"digit_reversal.*rev \d+="):
        rl.score(_BrokenTask(), ro)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("group_size", 1, "config.rl.group_size=1"),
        ("advantage", "ppo", "config.rl.advantage='ppo'"),
        ("aggregation", "sum", "config.rl.aggregation='sum'"),
        ("rollout_dtype", "fp8", "config.rl.rollout_dtype='fp8'"),
        ("dual_clip_c", 0.5, "config.rl.dual_clip_c=0.5"),
        ("num_draft_tokens", 4, "config.rl.num_draft_tokens=4"),
        ("updates_per_step", 3, "config.rl.updates_per_step=3"),
        ("temperature", 0.0, "config.rl.temperature=0.0"),
    ],
)
def test_bad_config_fields_are_named(field, value, needle):
    c = rl_tiny.get_config()
    c.rl[field] = value
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        rl.check_config(c, train.model_config(c))


def _main(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # One CPU device, as a user's (configs/rl_tiny.py's mesh is (1, 1, 1, 1)), same XLA flags.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root, "XLA_FLAGS": flags}
    return subprocess.run(
        [sys.executable, os.path.join(root, "main.py"), *args],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip


def test_cli_rl_runs_and_names_bad_fields(tmp_path):
    """``main.py --mode=rl`` from an SFT workdir writes per-step metrics and checkpoints; a bad
    config.rl field is one line on stderr naming it."""
    small = [
        "--config=configs/rl_tiny.py", "--config.model.embed_dim=32", "--config.model.mlp_dim=48",
        "--config.model.moe_mlp_dim=24", "--config.model.num_experts=4",
        "--config.model.num_mtp_layers=1", "--config.train.steps=2", "--config.train.batch_size=4",
        "--config.sft.num_examples=16", "--config.sft.heldout_prompts=4",
    ]  # fmt: skip
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    r = _main("--mode=sft", f"--workdir={sft_dir}", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    rl_flags = ["--config.rl.steps=2", "--config.rl.prompts_per_step=2", "--config.rl.group_size=2",
                "--config.rl.heldout_prompts=4", "--config.rl.max_new_tokens=4"]  # fmt: skip
    init = f"--config.init_from={sft_dir}"
    r = _main("--mode=rl", f"--workdir={rl_dir}", *small, init, *rl_flags)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _metrics(str(rl_dir))
    assert sorted(rows) == [0, 2] and "reward_mean" in rows[2] and "heldout_success" in rows[2]
    assert checkpoint.Checkpointer(str(rl_dir)).latest_step() == 2
    r = _main("--mode=rl", f"--workdir={tmp_path / 'bad'}", *small, init,
              "--config.rl.advantage=ppo")  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "config.rl.advantage='ppo'" in r.stderr, r.stderr
