"""main.py import_hf / export_hf, run as a user would, and the shipped configs."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax import checkpoint, hf, train
from mimo_jax.config import from_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_import_export_round_trip(tmp_path):
    model = mimo_jax.MiMoV2Flash(mimo_jax.tiny(num_layers=3, num_mtp_layers=2), rngs=nnx.Rngs(0))
    src, work, out = tmp_path / "src", tmp_path / "work", tmp_path / "out"
    hf.save_hf(model, str(src))
    r = _main("--mode=import_hf", f"--hf_dir={src}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr[-3000:]
    restored = checkpoint.load_model(str(work))
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = _main("--mode=export_hf", f"--workdir={work}", f"--hf_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    again = dict(hf._hf_tensors(hf.load_hf(str(out))))
    first = dict(hf._hf_tensors(model))
    assert again.keys() == first.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
    # A second import into the same workdir is refused; the checkpoint is untouched.
    r = _main("--mode=import_hf", f"--hf_dir={src}", f"--workdir={work}")
    assert r.returncode != 0 and "already holds checkpoints" in r.stderr


def test_cli_errors(tmp_path):
    r = _main("--mode=import_hf", f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0 and "--hf_dir" in r.stderr
    r = _main("--mode=train_everything", f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0 and "--mode" in r.stderr
    r = _main("--no_such_flag=1", f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0 and "no_such_flag" in r.stderr
    assert not os.path.exists(tmp_path / "w")
    r = _main("--mode=export_hf", f"--workdir={tmp_path / 'nothing'}", f"--hf_dir={tmp_path}/o")
    assert r.returncode != 0 and "model_config.json" in r.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "[!_b]*.py"))))
def test_shipped_configs_build(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = train.model_config(mod.get_config())  # resolves dtype='auto'
    model = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    assert len(model.mtp) == cfg.num_mtp_layers


def test_config_dict_errors():
    with pytest.raises(ValueError, match="unknown field"):
        from_config_dict({"num_layers": 2, "hidden_size": 3})
    with pytest.raises(ValueError, match="num_layers=3 but layer_types lists 2"):
        from_config_dict({"num_layers": 3, "layer_types": ["full_attention"] * 2})


def test_train_eval_generate_commands(tmp_path):
    wd = str(tmp_path / "run")
    small = [
        "--config=configs/debug.py",
        f"--workdir={wd}",
        "--config.data.max_bytes=200000",
        "--config.train.steps=6",
        "--config.train.batch_size=2",
        "--config.train.seq_len=32",
        "--config.train.log_every=3",
        "--config.train.eval_every=6",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=6",
        "--config.train.sample_len=8",
    ]
    r = _main(*small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--- sample ---" in r.stdout
    r = _main("--mode=eval", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val_bpb=" in r.stdout and "val_loss=" in r.stdout
    r = _main(
        "--mode=generate", f"--workdir={wd}", "--prompt=def f", "--max_new_tokens=12",
        "--num_draft_tokens=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("def f") and "mean accepted length" in r.stdout
    # The streamed text is exactly the generated continuation.
    streamed = r.stdout.split("\n[")[0]
    assert len(streamed.encode("utf-8", "replace")) >= len("def f") + 1
    r = _main("--mode=generate", f"--workdir={wd}", "--num_draft_tokens=2")
    assert r.returncode != 0 and "num_draft_tokens=2" in r.stderr
    r = _main(*small, "--config.train.no_such_key=1")
    assert r.returncode != 0 and "no_such_key" in r.stderr
