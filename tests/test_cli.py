"""main.py run as a user would (every mode, its output, its errors), and the shipped configs."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from chat_testing import write_tokenizer_dir
from flax import nnx

import mimo_jax
from mimo_jax import checkpoint, data, hf, train
from mimo_jax.config import from_config_dict
from mimo_jax.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix: I<mmdd> <time> ...


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


def _assert_user_error(r, *needles):
    """A user's mistake: non-zero status and one line on stderr, naming the problem."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("main.py: error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_import_export_round_trip(tmp_path):
    """Import and export keep every tensor; import brings the tokenizer files, which --chat uses."""
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=2, vocab_size=512)  # holds the 400-id BPE
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    src, work, out = tmp_path / "src", tmp_path / "work", tmp_path / "out"
    hf.save_hf(model, str(src))
    write_tokenizer_dir(src, ["hello world", "what is two plus two"])
    r = _main("--mode=import_hf", f"--hf_dir={src}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (work / name).read_bytes() == (src / name).read_bytes(), name
    r = _main(
        "--mode=generate", f"--workdir={work}", "--chat", "--prompt=hello", "--max_new_tokens=4"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "<|im_start|>" not in r.stdout and re.search(r"^\[\d tokens, ", r.stdout, re.M), r.stdout
    (work / "tokenizer_config.json").unlink()
    r = _main("--mode=generate", f"--workdir={work}", "--chat")
    _assert_user_error(r, "no chat template", "tokenizer_config.json")
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
    _assert_user_error(r, "already holds checkpoints")


def test_cli_errors(tmp_path):
    w = f"--workdir={tmp_path / 'w'}"
    _assert_user_error(_main("--mode=import_hf", w), "--hf_dir")
    _assert_user_error(_main("--mode=train_everything", w), "--mode")
    _assert_user_error(_main("--no_such_flag=1", w), "no_such_flag")
    _assert_user_error(_main("--config.train.stepz=3", w), "stepz", "steps")  # did you mean
    assert not os.path.exists(tmp_path / "w")
    nothing = f"--workdir={tmp_path / 'nothing'}"
    r = _main("--mode=export_hf", nothing, f"--hf_dir={tmp_path}/o")
    _assert_user_error(r, "model_config.json", "workdir")
    assert not os.path.exists(tmp_path / "o")
    _assert_user_error(_main("--mode=import_hf", w, f"--hf_dir={tmp_path}"), "config.json")
    # --verbosity=1 keeps the traceback of every error, a user's mistake included.
    r = _main("--mode=export_hf", nothing, f"--hf_dir={tmp_path}/o", "--verbosity=1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "model_config.json" in r.stderr


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
    out = r.stdout + r.stderr
    # Default output: progress lines (named as metrics.jsonl's keys), no absl/orbax INFO logs.
    assert not ABSL_INFO.search(out) and "orbax" not in out, out[-3000:]
    assert re.search(r"^step 3/6 \| loss [\d.]+ \| ce [\d.]+ \| mtp_ce [\d.]+ .*\| ETA ", out, re.M)
    assert re.search(r"^step 6/6 \| .*\| val_loss [\d.]+ \| val_bpb [\d.]+ \| took ", out, re.M)
    assert "--- sample ---" in r.stdout
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged] == [3, 6]
    for m in logged:  # the total is ce + (mtp_loss_weight / depths) * mtp_ce + aux term
        want = m["ce"] + 0.3 * m["mtp_ce_0"] + 1e-5 * m["aux_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5), m
    # --verbosity=0 brings the INFO logs back (the checkpointing library's among them).
    r = _main("--mode=eval", *small, "--verbosity=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val_bpb=" in r.stdout and "val_loss=" in r.stdout
    assert ABSL_INFO.search(r.stderr) and "checkpoint" in r.stderr
    r = _main(
        "--mode=generate", f"--workdir={wd}", "--prompt=def f", "--max_new_tokens=12",
        "--num_draft_tokens=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # The streamed text is exactly the continuation generate() gives for the same arguments.
    streamed, _, summary = r.stdout.rstrip("\n").rpartition("\n")
    assert summary.startswith("[12 tokens") and "mean accepted length" in summary, summary
    model, tok = checkpoint.load_model(wd), data.load_tokenizer(None)
    prompt = tok.encode("def f")
    res = generate(model, np.asarray(prompt)[None], max_new_tokens=12, num_draft_tokens=1,
                   eos_token_id=model.cfg.eos_token_id)  # fmt: skip
    new = np.asarray(res.tokens[0, len(prompt) : int(res.lengths[0])])
    assert len(new) == 12
    assert streamed == "def f" + tok.decode(new)
    r = _main("--mode=generate", f"--workdir={wd}", "--num_draft_tokens=2")
    _assert_user_error(r, "num_draft_tokens=2")
    assert r.stdout == ""  # not even the prompt: the arguments were refused first
    _assert_user_error(_main(*small, "--config.train.no_such_key=1"), "no_such_key")
    _assert_user_error(_main(*small, "--config.train.hold_steps=6"), "hold_steps")
