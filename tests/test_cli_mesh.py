"""main.py on a device mesh (8 fake CPU devices): generation straight from a HF directory, and
import_hf writing its checkpoint from the sharded model; both give the single-device tokens."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from chat_testing import write_tokenizer_dir
from hf_testing import assert_states_equal

import mimo_jax
from mimo_jax import checkpoint, hf
from mimo_jax.generate import generate
from notebooks.synthetic_checkpoint import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 full-attention and 4 sliding-window KV heads (transformers' ratio) and an even vocabulary:
# the decode preset's tensor axis splits them 2 ways; 8 experts over fsdp x expert (4 ways).
CFG = mimo_jax.tiny(
    num_layers=3, num_mtp_layers=1, vocab_size=512, num_kv_heads=2, swa_num_kv_heads=4
)
MESH = ["--config.mesh.shape=(1,2,2,2)", "--config.mesh.rules=decode"]
GREEDY = ["--prompt=hello world", "--max_new_tokens=6"]


def _main(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    return r


def _ok(r) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A HF checkpoint of a random model, with a 400-id BPE tokenizer and a chat template."""
    d = tmp_path_factory.mktemp("cli_mesh") / "hf"
    hf.save_hf(random_model(CFG, seed=3), str(d))
    write_tokenizer_dir(d, ["hello world", "what is two plus two", "the cat sat on the mat"])
    return d


def test_generate_from_hf_dir_on_mesh_equals_one_device(hf_dir):
    """Greedy text from the HF directory is the same on the (1, 2, 2, 2) decode mesh as on one
    device; --chat renders the directory's template and prints only the reply."""
    one = _ok(_main("--mode=generate", f"--hf_dir={hf_dir}", *GREEDY))
    assert re.search(r"^\[\d+ tokens, ", one, re.M), one
    assert _ok(_main("--mode=generate", f"--hf_dir={hf_dir}", *GREEDY, *MESH)) == one
    reply = _ok(_main("--mode=generate", f"--hf_dir={hf_dir}", "--chat", "--prompt=hi", *MESH))
    assert "<|im_start|>" not in reply and re.search(r"^\[\d+ tokens, ", reply, re.M), reply


def test_import_hf_on_mesh_then_generate_from_workdir(hf_dir, tmp_path):
    """import_hf on a mesh saves the sharded model; the restored checkpoint equals the HF load,
    and generating from the workdir (restored onto the mesh) prints the HF directory's text."""
    work = tmp_path / "work"
    _ok(_main("--mode=import_hf", f"--hf_dir={hf_dir}", f"--workdir={work}", *MESH))
    assert_states_equal(checkpoint.load_model(str(work)), hf.load_hf(str(hf_dir)))
    from_work = _ok(_main("--mode=generate", f"--workdir={work}", *GREEDY, *MESH))
    assert from_work == _ok(_main("--mode=generate", f"--hf_dir={hf_dir}", *GREEDY))
    # export_hf on the mesh restores sharded and writes the files a single-device export writes.
    _ok(_main("--mode=export_hf", f"--workdir={work}", f"--hf_dir={tmp_path / 'mesh'}", *MESH))
    _ok(_main("--mode=export_hf", f"--workdir={work}", f"--hf_dir={tmp_path / 'one'}"))
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "mesh"))
    for name in names:
        a, b = (tmp_path / d / name for d in ("one", "mesh"))
        assert a.read_bytes() == b.read_bytes(), name


def test_mesh_and_directory_errors(hf_dir, tmp_path):
    """A mesh that does not divide a sharded dim, and a directory that is not a HF checkpoint,
    end with one line naming the problem."""
    for args, needles in [
        ((f"--hf_dir={hf_dir}", "--config.mesh.shape=(1,1,1,8)", "--config.mesh.rules=decode"),
         ("not divisible", "tensor")),
        ((f"--hf_dir={tmp_path}",), ("config.json", "--hf_dir")),
        ((), ("--workdir or --hf_dir",)),
    ]:  # fmt: skip
        r = _main("--mode=generate", *args)
        assert r.returncode != 0, r.stdout[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("main.py: error: "), r.stderr
        for needle in needles:
            assert needle in r.stderr, (needle, r.stderr)


def test_generate_stops_at_any_of_several_eos_ids():
    """``eos_token_id`` may list several ids: each row ends after the first that it produces."""
    model = random_model(CFG, seed=3)
    prompt = np.asarray([[5, 9, 17, 33]])
    free = np.asarray(generate(model, prompt, max_new_tokens=8).tokens[0, 4:])
    unused = next(i for i in range(CFG.vocab_size) if i not in free)
    stop = free[3]
    want = free[: list(free).index(stop) + 1]
    res = generate(model, prompt, max_new_tokens=8, eos_token_id=(unused, stop))
    got = np.asarray(res.tokens[0, 4 : int(res.lengths[0])])
    np.testing.assert_array_equal(got, want)
    single = generate(model, prompt, max_new_tokens=8, eos_token_id=int(stop))
    np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(res.tokens))
