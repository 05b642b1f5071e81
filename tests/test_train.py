"""Training: loss goes down, MTP losses too, balancing works, resume is exact, errors are clear."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import debug
from mimo_jax import loss, train


def _config(**train_kw):
    c = debug.get_config()
    c.data.max_bytes = 400_000
    c.train.update(
        dict(
            steps=40,
            batch_size=4,
            seq_len=64,
            lr=3e-3,
            warmup_steps=5,
            log_every=1,
            eval_every=20,
            eval_batches=2,
            checkpoint_every=20,
            sample_len=0,
        )
    )
    c.train.update(train_kw)
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_debug_run_learns_and_resumes_exactly(tmp_path):
    wd = str(tmp_path / "run")
    train.train_and_evaluate(_config(), wd)
    first = _metrics(wd)
    assert [m["step"] for m in first] == list(range(1, 41))
    assert all(np.isfinite(m["ce"]) for m in first)
    early, late = np.mean([m["ce"] for m in first[:5]]), np.mean([m["ce"] for m in first[-5:]])
    assert late < early - 0.5, (early, late)
    mtp_early, mtp_late = first[0]["mtp_ce_0"], np.mean([m["mtp_ce_0"] for m in first[-5:]])
    assert mtp_late < mtp_early - 0.5, (mtp_early, mtp_late)
    assert "val_loss" in first[-1] and "val_bpb" in first[-1]
    for m in first:  # the logged total is the optimised loss: ce + (0.3 / depths) * mtp + aux
        want = m["ce"] + 0.3 * m["mtp_ce_0"] + 1e-5 * m["aux_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5), m
    assert os.path.isdir(os.path.join(wd, "tensorboard"))

    # "Kill" the run after its step-20 checkpoint: drop the final checkpoint and rerun.
    shutil.rmtree(os.path.join(wd, "checkpoints", "40"))
    train.train_and_evaluate(_config(), wd)
    resumed = _metrics(wd)[40:]
    assert [m["step"] for m in resumed] == list(range(21, 41))
    for a, b in zip(first[20:], resumed, strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-6, (a["step"], a["ce"], b["ce"])
        assert abs(a["mtp_ce_0"] - b["mtp_ce_0"]) <= 1e-6


def test_evaluate_spread_windows_and_whole_split():
    c = _config(batch_size=2, seq_len=16)
    model = train.MiMoV2Flash(train.model_config(c), rngs=nnx.Rngs(0))
    val = np.random.default_rng(0).integers(0, 256, 16 * 12 + 1)  # 12 windows: 6 batches of 2

    def val_loss(eval_batches):
        c.train.eval_batches = eval_batches
        return train.evaluate(model, val, c.train, 1.0)["val_loss"]

    everything = val_loss(0)
    assert val_loss(6) == pytest.approx(everything, rel=1e-6)
    assert val_loss(100) == pytest.approx(everything, rel=1e-6)
    assert val_loss(1) != pytest.approx(everything, rel=1e-6)
    # A budget of 2 batches evaluates windows 0, 3 | 6, 9 (spread over the split), not 0-3.
    graphdef, state = nnx.split(model)
    step = train.make_eval_step(graphdef)
    windows = [val[16 * w : 16 * w + 17] for w in (0, 3, 6, 9)]
    spread = np.mean([float(step(state, np.stack(windows[i : i + 2]))["ce"]) for i in (0, 2)])
    assert val_loss(2) == pytest.approx(spread, rel=1e-5)
    # The training loop passes one prebuilt step to every evaluation (no recompiling): evaluate
    # must run the step it is given, once per batch.
    calls = []

    def counted(state, batch):
        calls.append(batch.shape)
        return step(state, batch)

    reused = train.evaluate(model, val, c.train, 1.0, eval_step=counted)["val_loss"]
    assert reused == pytest.approx(spread, rel=1e-5)
    assert calls == [(2, 17), (2, 17)]
    with pytest.raises(ValueError, match=r"config.train.eval_batches=-1 must be >= 0"):
        val_loss(-1)


def test_bias_update_balances_a_skewed_router():
    c = _config(lr=0.0, bias_update_rate=0.005, aux_loss_weight=0.0)
    cfg = train.model_config(c)
    model = train.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    layer, r = model.layer(1)
    skew = jnp.zeros(cfg.num_experts).at[0].set(0.1)
    bias = layer.mlp.router.bias
    bias.set_value(skew if r is None else bias[...].at[r].set(skew))
    opt = train.make_optimizer(model, c.train)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split((model, opt))
    step = train.make_train_step(graphdef, cfg, c.train)
    tokens = jax.random.randint(jax.random.key(0), (1, 8, 65), 0, 256)
    imbalance = []
    for _ in range(40):
        state, m = step(state, tokens)
        imbalance.append(float(m["load_max_over_mean"]))
    # num_zeros counts exactly-zero gradient entries: at least the embedding rows of the byte
    # values absent from the batch (no tied head gives them a gradient), never every parameter.
    absent = cfg.vocab_size - len(np.unique(np.asarray(tokens)))
    assert absent * cfg.embed_dim <= float(m["num_zeros"]) < n_params, (absent, m["num_zeros"])
    # Step 1 sees every token on expert 0 in the skewed layer; the bias removes the skew.
    assert np.mean(imbalance[-10:]) < imbalance[0] - 0.3, imbalance


def test_unknown_config_key_and_bad_workdir(tmp_path):
    c = _config()
    c.model.unlock()
    c.model.hidden_size = 3
    with pytest.raises(ValueError, match="hidden_size"):
        train.train_and_evaluate(c, str(tmp_path / "a"))
    for key, value in (("hold_steps", 40), ("eval_batches", -1)):
        with pytest.raises(ValueError, match=key):  # before the workdir is created
            train.train_and_evaluate(_config(**{key: value}), str(tmp_path / key))
        assert not (tmp_path / key).exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(PermissionError, match="not writable"):
        train.train_and_evaluate(_config(), str(blocker / "sub"))


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> str:
    """A workdir holding a 2-step debug run (checkpoint at step 2); tests copy it."""
    wd = str(tmp_path_factory.mktemp("two_step") / "run")
    train.train_and_evaluate(_config(steps=2, checkpoint_every=2, eval_every=2), wd)
    return wd


def test_other_model_in_workdir_is_refused(two_step_run, tmp_path):
    wd = shutil.copytree(two_step_run, str(tmp_path / "run"))
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    c = _config(steps=4)
    c.model.embed_dim = 48
    with pytest.raises(ValueError, match="embed_dim"):
        train.train_and_evaluate(c, wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(two_step_run, tmp_path):
    wd = shutil.copytree(two_step_run, str(tmp_path / "run"))
    step_dir = os.path.join(wd, "checkpoints", "2")
    # Damage every data file of the saved model state.
    damaged = []
    for root, _, files in os.walk(step_dir):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0 and "model" in root:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                damaged.append(path)
    assert damaged
    snapshot = {p: pathlib.Path(p).read_bytes() for p in damaged}
    with pytest.raises(ValueError, match="checkpoint step 2 .* unreadable"):
        train.train_and_evaluate(_config(steps=4), wd)
    assert {p: pathlib.Path(p).read_bytes() for p in damaged} == snapshot


def test_partial_checkpoints(two_step_run, tmp_path):
    """A save killed before it finished (orbax's unfinalized temp directory) is ignored: the run
    resumes from the last whole checkpoint. A step missing an item is a clear error, left alone."""
    wd = shutil.copytree(two_step_run, str(tmp_path / "killed_save"))
    stale = os.path.join(wd, "checkpoints", "4.orbax-checkpoint-tmp", "model")
    os.makedirs(stale)
    pathlib.Path(stale, "half_written").write_bytes(b"\0" * 10)
    train.train_and_evaluate(_config(steps=4, checkpoint_every=2, eval_every=2), wd)
    assert [m["step"] for m in _metrics(wd)] == [1, 2, 3, 4]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]

    wd = shutil.copytree(two_step_run, str(tmp_path / "no_opt"))
    shutil.rmtree(os.path.join(wd, "checkpoints", "2", "opt"))
    before = sorted(os.listdir(os.path.join(wd, "checkpoints", "2")))
    with pytest.raises(ValueError, match=r"checkpoint step 2 .* unreadable.*opt"):
        train.train_and_evaluate(_config(steps=4), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints", "2"))) == before


def test_remat_and_chunked_loss_give_the_same_loss_and_gradients():
    """Remat and the chunked cross-entropy (chunk 7 of 32 positions: a padded tail) change
    memory only: loss and every gradient equal the plain computation's."""
    c = _config()
    cfg = train.model_config(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 256)

    def loss_and_grads(remat, chunk):
        model = train.MiMoV2Flash(cfg.replace(remat=remat), rngs=nnx.Rngs(0))

        def loss_of(m):
            return loss.model_loss(m, tokens, mtp_weight=0.3, aux_weight=1e-2, chunk=chunk)[0]

        return jax.jit(nnx.value_and_grad(loss_of))(model)

    plain_loss, plain = loss_and_grads(False, 0)
    for remat, chunk in ((True, 0), (False, 7)):
        other_loss, other = loss_and_grads(remat, chunk)
        np.testing.assert_allclose(other_loss, plain_loss, atol=1e-6, rtol=0)
        for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(other), strict=True):
            assert np.max(np.abs(np.asarray(x) - np.asarray(y))) < 1e-6, (remat, chunk)


def test_learning_rate_schedule_warmup_hold_cosine():
    """Warmup is linear from 0, the peak is held `hold_steps`, then a cosine reaches
    lr * min_lr_ratio at `steps`; hold 0 is plain warmup + cosine; a hold that leaves no decay
    is an error naming the field."""
    tc = _config(steps=100, warmup_steps=10, hold_steps=40, lr=2.0, min_lr_ratio=0.1).train
    lr = train.learning_rate_schedule(tc)

    def cosine(step, start):
        frac = (step - start) / (100 - start)
        return 2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))

    for step, want in [(0, 0.0), (5, 1.0), (10, 2.0), (30, 2.0), (50, 2.0), (75, cosine(75, 50)),
                       (100, 0.2), (120, 0.2)]:  # fmt: skip
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6, atol=1e-7)
    plain = train.learning_rate_schedule(_config(steps=100, warmup_steps=10, lr=2.0).train)
    for step in (10, 40, 55, 99):
        np.testing.assert_allclose(float(plain(step)), cosine(step, 10), rtol=1e-6)
    for bad in (-1, 90):
        with pytest.raises(ValueError, match="hold_steps"):
            train.learning_rate_schedule(_config(steps=100, warmup_steps=10, hold_steps=bad).train)
