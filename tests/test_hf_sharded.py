"""``load_hf`` onto a device mesh (mimo_jax/hf_slices.py): each device's shard read alone.

A small hub-format checkpoint (FP8 weights whose dims are not multiples of 128, the fused K|V
scales of the full-attention layer, per-expert tensors of a scanned MoE stack, an MTP block,
three safetensors files with an index) is loaded on 8 fake CPU devices under every preset, on a
mesh that splits fsdp, expert and tensor 2 ways each, and compared bit for bit with the
single-device load; every parameter has the sharding ``sharding.create_model`` gives it.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from hf_testing import flat_state, read_config, read_dir
from safetensors.torch import save_file
from test_fp8 import quantize_blocks, quantize_fused_kv

import mimo_jax
from mimo_jax import fp8, hf, hf_slices
from mimo_jax import sharding as sh
from notebooks.synthetic_checkpoint import random_model

CFG = mimo_jax.tiny(
    num_layers=3,  # dense full-attention layer 0, then 2 sliding-window MoE layers, scanned
    num_mtp_layers=1,
    vocab_size=256,
    embed_dim=160,  # 128 + 32: every FP8 tensor has a ragged column block
    mlp_dim=200,
    moe_mlp_dim=144,
    num_heads=4,
    num_kv_heads=2,
    swa_num_kv_heads=4,
    head_dim=192,
    v_head_dim=128,
    num_experts=8,
    param_dtype="bfloat16",
)
MESH = (1, 2, 2, 2)
FULL_K, FULL_V = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def _torch_fp8(q: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)


def _write_sharded(path, tensors: dict[str, torch.Tensor], config: dict, num_files: int = 3):
    """Tensors spread round-robin over ``num_files`` safetensors files, with an index."""
    os.makedirs(path)
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_files):
        fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::num_files]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def make_hub(root, cfg) -> str:
    """Writes the FP8 hub-format checkpoint of a random ``cfg`` model under ``root``; its path."""
    hf.save_hf(random_model(cfg, seed=5), root / "bf16")
    tensors, config = read_dir(root / "bf16"), read_config(root / "bf16")
    source = {n: t.float().numpy() for n, t in tensors.items()}
    for name in [n for n in source if fp8.RELEASE_FP8.search(n) and n not in (FULL_K, FULL_V)]:
        q, s, _, _ = quantize_blocks(source[name])
        tensors[name], tensors[fp8.scale_name(name)] = _torch_fp8(q), torch.from_numpy(s)
    fused = quantize_fused_kv(source[FULL_K], source[FULL_V], num_heads=cfg.num_kv_heads)
    for name, (q, s, _, _) in zip((FULL_K, FULL_V), fused, strict=True):
        tensors[name], tensors[fp8.scale_name(name)] = _torch_fp8(q), torch.from_numpy(s)
    shutil.rmtree(root / "bf16")
    _write_sharded(root / "fp8", tensors, config)
    return str(root / "fp8")


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> str:
    """The FP8 hub-format checkpoint directory of ``CFG``."""
    path = make_hub(tmp_path_factory.mktemp("hub"), CFG)
    ckpt = hf_slices.Checkpoint(path)
    assert ckpt.shape(fp8.scale_name(FULL_K)) == (4, 2)  # fused; plain blocks give (3, 2)
    assert any(EXPERT.search(n) and ckpt.dtype(n) == "F8_E4M3" for n in ckpt.meta)
    return path


@pytest.fixture(scope="module")
def single(hub) -> dict[tuple, np.ndarray]:
    """The single-device load (no mesh), as numpy."""
    return flat_state(hf.load_hf(hub))


@pytest.mark.parametrize("preset", list(sh.RULES))
def test_sharded_load_equals_single_device(hub, single, preset):
    with sh.use_mesh(sh.make_mesh(MESH), preset):
        model = hf.load_hf(hub)
        # The layout create_model constrains every parameter to.
        abstract = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(model.cfg, rngs=nnx.Rngs(0)))
        want = dict(nnx.to_flat_state(sh.state_shardings(abstract)))
    got = nnx.to_flat_state(nnx.state(model))
    assert len(got) == len(single) > 30
    split = 0
    for path, var in got:
        x, where = var.get_value(), want[path].get_value()
        name = ".".join(map(str, path))
        assert x.sharding.is_equivalent_to(where, x.ndim), f"{name}: {x.sharding} != {where}"
        split += len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        y = np.asarray(x)
        assert y.dtype == single[path].dtype, name
        assert np.array_equal(y, single[path]), f"{preset} {name}: not bit-exact"
    assert split > 20, f"{preset}: only {split} parameters are split across devices"


def test_each_device_reads_only_its_part(hub, monkeypatch):
    """fsdp_ep on (1, 2, 2, 2) splits every expert weight 8 ways (experts over ``expert``, their
    embed dim over fsdp x tensor), with no replica: each per-expert hub tensor must be read in
    exactly 4 quarters (for the 4 devices holding its expert), never whole."""
    reads: dict[str, list[int]] = {}
    read_box = hf_slices.Checkpoint.read_box

    def counting(self, name, box):
        x = read_box(self, name, box)
        reads.setdefault(name, []).append(x.nbytes)
        return x

    monkeypatch.setattr(hf_slices.Checkpoint, "read_box", counting)
    with sh.use_mesh(sh.make_mesh(MESH), "fsdp_ep"):
        hf.load_hf(hub)
    ckpt = hf_slices.Checkpoint(hub)
    experts = [n for n in ckpt.meta if EXPERT.search(n) and n.endswith(".weight")]
    assert len(experts) == 2 * 8 * 3
    for name in experts:
        whole = ckpt.read(name).nbytes
        assert reads[name] == [whole // 4] * 4, (name, whole, reads[name])
    # A replicated parameter is read once per process, not once per device.
    assert reads["model.norm.weight"] == [ckpt.read("model.norm.weight").nbytes]
    assert all(len(v) <= 8 for v in reads.values())


# A fresh process loads the checkpoint and prints the rise of its peak resident memory during
# load_hf, the model's bytes and its largest parameter's bytes. Linux's VmHWM, not getrusage:
# a child's ru_maxrss starts at its parent's peak (here the pytest process's).
_MEASURE = """
import contextlib, re, sys
from flax import nnx
from mimo_jax import hf, sharding as sh
path, preset = sys.argv[1], sys.argv[2]
status = lambda: open("/proc/self/status").read()
peak = lambda: int(re.search(r"VmHWM:\\s*(\\d+) kB", status()).group(1)) * 1024
mesh = sh.use_mesh(sh.make_mesh((1, 2, 2, 2)), preset) if preset else contextlib.nullcontext()
with mesh:
    before = peak()
    model = hf.load_hf(path)
    rise = peak() - before
sizes = [v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model))]
print(rise, sum(sizes), max(sizes))
"""


def _load_peak(path: str, preset: str) -> tuple[int, int, int]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, path, preset],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    rise, model, largest = map(int, out.stdout.split())
    return rise, model, largest


def test_host_memory_is_bounded_by_a_shard(tmp_path):
    """Peak resident memory of a sharded load (fsdp_ep on (1, 2, 2, 2), fp32 parameters, 32 experts)
    rises by the model's bytes (fake CPU devices live in host memory) plus at most half the
    largest parameter, whose shards are 1/8 of it; loading without a mesh holds that whole
    parameter beside the model (printed for comparison, not asserted: it depends on whether
    XLA:CPU copies the host buffer)."""
    cfg = dataclasses.replace(
        CFG, embed_dim=768, mlp_dim=256, moe_mlp_dim=512, num_experts=32, param_dtype="float32"
    )
    path = make_hub(tmp_path, cfg)
    rise, model, largest = _load_peak(path, "fsdp_ep")
    single = _load_peak(path, "")[0]
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(
        f"model {mib(model)}, largest parameter {mib(largest)}; peak rise: sharded {mib(rise)}, "
        f"single device {mib(single)}"
    )
    assert largest >= 64 << 20, largest  # large enough for the bound to mean something
    assert rise < model + largest // 2, (mib(rise), mib(model), mib(largest))
