"""SFT: response-only loss against NumPy, exact resume, init_from sources, --mode=sft."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close

from configs import debug, rl_tiny
from mimo_jax import checkpoint, data, hf, train
from mimo_jax import sharding as sh
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import policy, sft, sft_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train_kw):
    """rl_tiny's task and SFT fields on the debug model: seconds per run."""
    c = rl_tiny.get_config()
    c.model = debug.get_config().model
    c.data.max_bytes = 200_000  # the pre-training run of the init_from test
    c.task.options = {"min_digits": 3, "max_digits": 4}
    c.train.update(
        dict(steps=4, batch_size=4, seq_len=16, warmup_steps=1, log_every=1, eval_every=4,
             checkpoint_every=2, eval_batches=1)
    )  # fmt: skip
    c.train.update(train_kw)
    c.sft.update(dict(num_examples=32, heldout_prompts=0))
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _log_softmax_nll(logits, labels):
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]  # [B, T]


def test_loss_is_response_only_and_matches_numpy():
    c = _config(mtp_loss_weight=0.3, aux_loss_weight=0.01)
    c.model.num_mtp_layers = 2
    cfg = train.model_config(c)
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    rows = [
        {"prompt": "rev 123=", "response": "321\n"},
        {"prompt": "a longer prompt: rev 9876=", "response": "6789\n"},  # truncated on the left
        {"prompt": "x", "response": "12\n"},
    ]
    ds = sft_data.SFTDataset(rows, data.ByteTokenizer(), 16)
    b = ds.batch(batch_size=3, seed=0, step=0)
    loss_fn = sft.make_loss_fn(cfg, c.train, packing=False)

    def loss_and_grads(labels):
        batch = {
            "ids": b.ids, "labels": labels, "loss_mask": b.loss_mask, "positions": b.positions,
            "segment_ids": b.segment_ids,
            "mtp": sft_data.mtp_targets(
                sft_data.SFTBatch(b.ids, labels, b.loss_mask, b.positions, b.segment_ids), 2
            ),
        }  # fmt: skip
        return grad_fn(params, jax.tree.map(jnp.asarray, batch))

    gd, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, x: loss_fn(nnx.merge(gd, p, rest), x)[0]))

    loss, grads = loss_and_grads(b.labels)

    # NumPy reference: masked CE of the main head and of each MTP depth k, whose label at input
    # i is labels[i + k + 1], counted where that label is a response label within the row.
    out = nnx.jit(lambda m, ids, pos: m(ids, pos))(model, b.ids, b.positions)
    mask = b.loss_mask.astype(np.float64)
    want = (_log_softmax_nll(np.asarray(out.logits), b.labels) * mask).sum() / mask.sum()
    for k, logits in enumerate(out.mtp_logits):
        s = k + 1
        labels_k = np.zeros_like(b.labels)
        labels_k[:, :-s] = b.labels[:, s:]
        mask_k = np.zeros_like(mask)
        mask_k[:, :-s] = mask[:, s:]
        ce_k = (_log_softmax_nll(np.asarray(logits), labels_k) * mask_k).sum() / mask_k.sum()
        want += 0.3 / 2 * ce_k
    want += 0.01 * float(np.sum(out.aux["seq_aux_loss"]))
    assert_close(loss, want, FP32_REL, "SFT loss")

    # Junk at every prompt and padding label changes neither the loss nor the gradients.
    rng = np.random.default_rng(0)
    junk = np.where(b.loss_mask > 0, b.labels, rng.integers(0, 256, b.labels.shape)).astype(
        np.int32
    )
    assert (junk != b.labels).sum() > 10
    loss2, grads2 = loss_and_grads(junk)
    assert float(loss2) == float(loss)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))
    # A response label does change it.
    changed = b.labels.copy()
    r, i = np.argwhere(b.loss_mask > 0)[0]
    changed[r, i] = (changed[r, i] + 1) % 256
    assert abs(float(loss_and_grads(changed)[0]) - float(loss)) > 1e-4


def test_resume_is_exact(tmp_path):
    wd = str(tmp_path / "sft")
    sft.run(_config(), wd)
    first = _metrics(wd)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert all(m["response_tokens"] > 0 and np.isfinite(m["ce"]) for m in first)
    assert {"num_zeros", "grad_norm", "lr", "load_max_over_mean", "mtp_ce_0"} <= set(first[-1])
    done = _leaves(checkpoint.load_model(wd))
    # "Kill" the run after its step-2 checkpoint and resume it.
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    sft.run(_config(), wd)
    assert [m["step"] for m in _metrics(wd)[4:]] == [3, 4]
    for a, b in zip(first[2:], _metrics(wd)[4:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    for a, b in zip(done, _leaves(checkpoint.load_model(wd)), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_init_from_pretraining_workdir_and_hf(tmp_path):
    pre = str(tmp_path / "pre")
    train.train_and_evaluate(
        _config(steps=2, seq_len=32, checkpoint_every=2, eval_every=2, sample_len=0), pre
    )
    # lr 0 and no bias updates: the SFT run's final weights are the ones it started from.
    c = _config(steps=1, lr=0.0, bias_update_rate=0.0)
    c.init_from = pre
    sft.run(c, str(tmp_path / "sft"))
    want = _leaves(checkpoint.load_model(pre))
    for a, b in zip(want, _leaves(checkpoint.load_model(str(tmp_path / "sft"))), strict=True):
        np.testing.assert_array_equal(b, a)

    cfg = train.model_config(c)
    src = MiMoV2Flash(cfg, rngs=nnx.Rngs(3))
    for i in range(1, cfg.num_layers):  # non-zero expert biases, so they are checked too
        layer, r = src.layer(i)
        bias, value = layer.mlp.router.bias, jnp.linspace(-1.0, 1.0, cfg.num_experts) * i
        bias.set_value(value if r is None else bias[...].at[r].set(value))
    hf.save_hf(src, str(tmp_path / "hf"))
    with sh.use_mesh(sh.make_mesh(c.mesh.shape), c.mesh.rules):
        got = policy.init_model(c, cfg, init_from=str(tmp_path / "hf"))
    for a, b in zip(_leaves(src), _leaves(got), strict=True):
        np.testing.assert_array_equal(b, a)


def test_bad_init_from_and_config_errors(tmp_path):
    c = _config()
    cfg = train.model_config(c)
    mesh = sh.make_mesh(c.mesh.shape)
    with sh.use_mesh(mesh, c.mesh.rules):
        for path in (str(tmp_path / "missing"), str(tmp_path)):
            with pytest.raises(ValueError, match=r"config\.init_from=.*HF checkpoint directory"):
                policy.init_model(c, cfg, init_from=path)
        checkpoint.save_model_config(str(tmp_path / "other"), train.model_config(c))
        with pytest.raises(ValueError, match=r"config\.init_from=.*no checkpoint"):
            policy.init_model(c, cfg, init_from=str(tmp_path / "other"))
        c.model.embed_dim = 48
        with pytest.raises(ValueError, match=r"config\.init_from=.*embed_dim: 32 vs 48"):
            policy.init_model(c, train.model_config(c), init_from=str(tmp_path / "other"))
    bad = _config()
    bad.sft.data = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"config\.sft\.data="):
        sft.run(bad, str(tmp_path / "w"))
    bad = _config()
    bad.task.name = "chess"
    with pytest.raises(ValueError, match=r"config\.task\.name='chess'"):
        sft.run(bad, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_sft_command(tmp_path):
    wd = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "main.py"), "--mode=sft",
            "--config=configs/rl_tiny.py", f"--workdir={wd}", "--config.model.num_layers=2",
            "--config.model.num_mtp_layers=1", "--config.train.steps=3",
            "--config.train.batch_size=4", "--config.train.log_every=3",
            "--config.train.eval_every=3", "--config.sft.num_examples=16",
            "--config.sft.heldout_prompts=4",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3/3 | loss" in r.stdout and "heldout_success" in r.stdout, r.stdout
    (last,) = _metrics(wd)
    assert last["step"] == 3 and 0.0 <= last["heldout_success"] <= 1.0
    assert checkpoint.Checkpointer(str(wd)).latest_step() == 3
