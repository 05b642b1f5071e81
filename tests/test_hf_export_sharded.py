"""``save_hf`` of a model sharded over 8 fake CPU devices: one tensor gathered at a time.

The sharded export must write the same files, byte for byte, as the export of the same weights
on one device, and transformers must load it with the logits of our model; so must the export
of two ``jax.distributed`` processes whose arrays neither process can address whole.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import process_testing
import pytest
import torch
from flax import nnx
from hf_testing import flat_state
from numerics_testing import FP32_REL, assert_close
from transformers import MiMoV2FlashForCausalLM

import mimo_jax
from mimo_jax import hf
from mimo_jax import sharding as sh
from notebooks.synthetic_checkpoint import random_model

CFG = mimo_jax.tiny(
    num_layers=4,
    num_mtp_layers=1,
    sliding_window=6,
    initializer_range=0.1,
    num_kv_heads=2,  # tp_ep splits KV heads 2 ways
    swa_num_kv_heads=4,
)
MESH = (1, 2, 2, 2)
SHARD = 1 << 18  # bytes per file: the tiny model spans several files
_logits = jax.jit(lambda m, ids: m(ids, mtp=False).logits)


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> str:
    """The single-device export of the random model, in small files (several shards)."""
    path = tmp_path_factory.mktemp("single") / "ckpt"
    hf.save_hf(random_model(CFG, seed=7), path, max_shard_bytes=SHARD)
    return str(path)


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.parametrize("preset", ["fsdp_ep", "tp_ep"])
def test_sharded_export_is_bit_exact_and_loads_in_transformers(single_dir, preset, tmp_path):
    with sh.use_mesh(sh.make_mesh(MESH), preset):
        model = hf.load_hf(single_dir)
        split = [
            v.get_value()
            for _, v in nnx.to_flat_state(nnx.state(model))
            if not v.get_value().sharding.is_fully_replicated
        ]
        assert len(split) > 10, f"{preset}: only {len(split)} parameters are sharded"
        hf.save_hf(model, tmp_path / "ckpt", max_shard_bytes=SHARD)
    want, got = _files(single_dir), _files(str(tmp_path / "ckpt"))
    assert got.keys() == want.keys() and len(got) > 4, sorted(got)
    for name in want:
        assert got[name] == want[name], f"{preset}: {name} differs from the single-device export"

    tm = MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    tm.eval()
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 13))
    with torch.no_grad():
        want_logits = tm(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    with sh.use_mesh(sh.make_mesh(MESH), preset):
        got_logits = _logits(model, jnp.asarray(ids))
    assert_close(got_logits, want_logits, FP32_REL, f"{preset}: sharded export in transformers")


def test_sharded_export_of_create_model(tmp_path):
    """A model initialised sharded (never whole on one device) exports its exact values, in the
    files the single-device export of those values writes."""
    with sh.use_mesh(sh.make_mesh(MESH), "fsdp_ep"):
        model = sh.create_model(CFG, seed=2)
        hf.save_hf(model, tmp_path / "sharded", max_shard_bytes=SHARD)
    single = hf.load_hf(str(tmp_path / "sharded"))
    want = flat_state(model)
    got = flat_state(single)
    assert got.keys() == want.keys()
    for path, x in got.items():
        assert x.dtype == want[path].dtype and np.array_equal(x, want[path]), path
    hf.save_hf(single, tmp_path / "one", max_shard_bytes=SHARD)
    assert _files(str(tmp_path / "sharded")) == _files(str(tmp_path / "one"))


# argv: coordinator address, process id, source checkpoint, output directory, max_shard_bytes.
_CHILD = """
import sys
import jax
coordinator, pid, src, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=pid)
from mimo_jax import hf, sharding as sh
with sh.use_mesh(sh.make_mesh((1, 2, 4, 1)), "fsdp_ep"):
    model = hf.load_hf(src)
    assert not model.lm_head.kernel.get_value().is_fully_addressable
    hf.save_hf(model, out, max_shard_bytes=int(sys.argv[5]))
"""


def test_two_process_export_is_bit_exact(single_dir, tmp_path):
    """Two processes with 4 fake CPU devices each, one 8-device mesh: process 0 writes the files
    of the single-device export, byte for byte."""
    port = process_testing.free_port()
    argv = ["-c", _CHILD, f"localhost:{port}"]
    rest = [single_dir, str(tmp_path / "two"), str(SHARD)]
    logs = [open(tmp_path / f"process{pid}.log", "w+") for pid in range(2)]  # noqa: SIM115
    procs = [
        process_testing.launch(4, [*argv, str(pid), *rest], stdout=logs[pid]) for pid in range(2)
    ]
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=300)
        log.seek(0)
        assert p.returncode == 0, log.read()[-3000:]
        log.close()
    assert _files(str(tmp_path / "two")) == _files(single_dir)
