"""Loading a hub-format FP8 checkpoint: sharded streaming ``load_hf`` vs the single-device path.

    python bench/convert.py                 # ~300 MB synthetic FP8 checkpoint (a few minutes)
    python bench/convert.py --quick         # a few MB, smoke test
    python bench/convert.py --out bench/results/convert.json

A synthetic checkpoint in the release's format (FP8 e4m3 weights with 128x128 block scales, dims
that cut blocks, per-expert tensors, an MTP block, several safetensors files with an index) is
written to a temporary directory. Fresh processes, each with 8 fake CPU devices, then load it
(a) without a mesh, as one array per parameter on one device, and (b) under
``sharding.use_mesh`` on a (1, 2, 2, 2) mesh with the ``fsdp_ep`` and ``tp_ep`` presets, each
device's shard read and dequantized alone (``mimo_jax.hf_slices``). Each process reports the
wall time of ``load_hf`` and the rise of its peak resident memory (Linux ``VmHWM``) during it;
each path is loaded ``--repeats`` times (median time, highest peak).
Fake CPU devices live in host memory, so the rise includes the loaded model itself (every
device's shards, replicas included); the table also gives the rise above those bytes, which is
what loading costs beyond its result.

From the sharded rate (file bytes read per second, dequantization and device transfer included)
and the memory bound of the streaming path, the script then estimates, per host, what loading the
released checkpoint takes on a 4-host x 4-device slice and on one 8-device node. The shapes come
from ``nnx.eval_shape`` of ``mimo_jax.mimo_v2_flash()`` (nothing is allocated) and the blocks
each host's devices hold from ``mimo_jax.layout``. It is an estimate from CPU measurements: the
loader's dequantization runs on one host core, as here, and storage is assumed to deliver the
bytes faster than that (files in page cache or on local NVMe).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file

import mimo_jax
from mimo_jax import fp8, hf, layout
from mimo_jax.hf_config import config_to_hf

MEASURED_MESH = (1, 2, 2, 2)  # data, fsdp, expert, tensor: 8 fake devices
PRESETS = ("fsdp_ep", "tp_ep")
# The released checkpoint (per host): a TPU slice of 4 hosts x 4 chips and one 8-GPU node.
TARGETS = {
    "4 hosts x 4 devices": ((1, 2, 4, 2), 4),  # mesh shape, devices per host
    "1 host x 8 devices": ((1, 1, 4, 2), 8),
}


def synthetic_config(quick: bool) -> mimo_jax.ModelConfig:
    """The synthetic model: the release's structure and head dims, dims that cut 128-blocks."""
    if quick:
        dims = dict(num_layers=3, vocab_size=512, embed_dim=320, mlp_dim=256, moe_mlp_dim=144)
        dims.update(num_experts=8)
    else:
        # 1088 = 8.5 blocks; the expert weights (6 x 32 x 3 x 1088 x 512 FP8) are ~300 MB.
        dims = dict(num_layers=7, vocab_size=8192, embed_dim=1088, mlp_dim=1536, moe_mlp_dim=512)
        dims.update(num_experts=32)
    return mimo_jax.tiny(
        **dims,
        num_mtp_layers=1,
        num_heads=8,
        num_kv_heads=2,
        swa_num_kv_heads=4,
        head_dim=192,
        v_head_dim=128,
        param_dtype="bfloat16",
    )


def write_checkpoint(path: str, cfg: mimo_jax.ModelConfig, file_bytes: int = 96 << 20) -> int:
    """Writes a random hub-format FP8 checkpoint of ``cfg`` (files of ~``file_bytes``, an index).

    Projections are FP8 with plain 128x128 block scales; embeddings, norms, router, o_proj and
    lm_head are bf16, as in the release. Nothing the size of the model is held in memory.

    Returns:
      Total bytes of the tensors written.
    """
    os.makedirs(path)
    abstract = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    pending: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []
    size = total = 0

    def flush():
        nonlocal pending, size
        fname = f"part-{len(files)}.safetensors"
        save_file(pending, os.path.join(path, fname), metadata={"format": "pt"})
        files.append((fname, list(pending)))
        pending, size = {}, 0

    for name, entry in hf.hf_entries(abstract).items():
        std = 1.0 if name.endswith("norm.weight") else cfg.initializer_range
        x = std * rng.standard_normal(entry.hf_shape, np.float32)
        if name.endswith("norm.weight"):
            x += 1.0
        if fp8.RELEASE_FP8.search(name):
            q, scale = fp8.quantize_fp8(x)
            q = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            scale = torch.from_numpy(scale)
            pending[name], pending[fp8.scale_name(name)] = q, scale
            size += q.nbytes + scale.nbytes
        else:
            pending[name] = torch.from_numpy(x).to(torch.bfloat16)
            size += pending[name].nbytes
        if size >= file_bytes:
            flush()
    if pending:
        flush()
    weight_map = {}
    for i, (fname, names) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(os.path.join(path, fname), os.path.join(path, new))
        weight_map.update(dict.fromkeys(names, new))
        total += os.path.getsize(os.path.join(path, new))
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f)
    return total


# ---------------------------------------------------------------------------------------------
# One load, in a fresh process.

_CHILD = """
import contextlib, json, re, sys, time
import jax
from flax import nnx
from mimo_jax import hf, sharding as sh
path, preset, mesh = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3].split(",")))
peak = lambda: int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
use = sh.use_mesh(sh.make_mesh(mesh), preset) if preset else contextlib.nullcontext()
with use:
    before = peak() * 1024
    t0 = time.perf_counter()
    model = jax.block_until_ready(hf.load_hf(path))
    seconds = time.perf_counter() - t0
    rise = peak() * 1024 - before
values = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
resident = sum(s.data.nbytes for x in values for s in x.addressable_shards)  # replicas included
print(json.dumps(dict(seconds=seconds, rise=rise, baseline=before, resident=resident,
                      model=sum(x.nbytes for x in values), largest=max(x.nbytes for x in values))))
"""


def measure(path: str, preset: str) -> dict:
    """Loads ``path`` in a fresh process with 8 fake CPU devices; its time and peak memory rise."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    mesh = ",".join(map(str, MEASURED_MESH))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path, preset, mesh],
        cwd=common.REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"load ({preset or 'single device'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# What each host reads and holds, from shapes.


def _file_bytes_per_element(name: str) -> float:
    """Bytes per element in the hub files: FP8 + a float32 scale per 128x128 block, or bf16."""
    return 1 + 4 / 128**2 if fp8.RELEASE_FP8.search(name) else 2


def host_plan(cfg: mimo_jax.ModelConfig, mesh: tuple, preset: str, per_host: int) -> dict:
    """Per host (mesh positions ``h * per_host ...`` on host h): file bytes its devices' blocks
    need (each block read once per host) and the streaming loader's host-memory bound.

    The bound is the largest block one device holds (in the parameter dtype) plus three copies,
    in float32, of the largest part one hub tensor contributes to a block (read, dequantized,
    transposed), as ``mimo_jax.hf_slices.sharded_leaf`` builds them.

    Returns:
      dict: read_bytes (the most any host reads), bound_bytes, device_bytes (what one device
      holds), param_bytes (the whole model), file_bytes (its hub files), largest_param_bytes.
    """
    abstract = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    layouts = {p.path: p for p in layout.describe_shardings(abstract, mesh, preset)}
    kinds: dict[str, tuple[float, int]] = {}  # leaf -> (file bytes / element, index dims)
    for name, entry in hf.hf_entries(abstract).items():
        kinds[".".join(map(str, entry.path))] = (_file_bytes_per_element(name), len(entry.index))
    hosts = math.prod(mesh) // per_host
    read = np.zeros(hosts)
    bound_block = bound_part = 0
    for path, lay in layouts.items():
        per_elem, k = kinds[path]
        held = (lay.devices // per_host)[..., None] == np.arange(hosts)  # [*blocks, R, hosts]
        blocks_on_host = held.any(axis=-2).reshape(-1, hosts).sum(axis=0)  # [hosts]
        read += blocks_on_host * math.prod(lay.shard_shape) * per_elem
        bound_block = max(bound_block, lay.shard_nbytes)
        part = math.prod(lay.shard_shape[k:]) * (4 if per_elem < 2 else 2)
        bound_part = max(bound_part, part)
    return dict(
        read_bytes=float(read.max()),
        bound_bytes=bound_block + 3 * bound_part,
        device_bytes=sum(p.shard_nbytes for p in layouts.values()),
        param_bytes=sum(p.nbytes for p in layouts.values()),
        file_bytes=sum(p.nbytes / p.dtype.itemsize * kinds[n][0] for n, p in layouts.items()),
        largest_param_bytes=max(p.nbytes for p in layouts.values()),
    )


# ---------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-MB checkpoint (smoke test)")
    p.add_argument("--out", default=None, help="JSON results path (default: none)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process loads per path")
    a = p.parse_args()
    cfg = synthetic_config(a.quick)
    print(f"host: {common.host_info()}")
    with tempfile.TemporaryDirectory(prefix="mimo-convert-") as tmp:
        t0 = time.perf_counter()
        path = os.path.join(tmp, "hub")
        file_bytes = write_checkpoint(path, cfg)
        nfiles = len([f for f in os.listdir(path) if f.endswith(".safetensors")])
        print(
            f"synthetic FP8 checkpoint: {_gb(file_bytes)} in {nfiles} files "
            f"(written in {time.perf_counter() - t0:.0f} s)"
        )
        runs = {}
        for label, preset in [("single device", ""), *((pr, pr) for pr in PRESETS)]:
            tries = [measure(path, preset) for _ in range(a.repeats)]
            # The median time (a shared host's load varies run to run); the highest peak.
            runs[label] = dict(sorted(tries, key=lambda r: r["seconds"])[len(tries) // 2])
            runs[label]["rise"] = max(r["rise"] for r in tries)
            runs[label]["all_seconds"] = [r["seconds"] for r in tries]

    plans = {pr: host_plan(cfg, MEASURED_MESH, pr, 8) for pr in PRESETS}
    base = runs["single device"]
    print(
        f"\nload_hf, fresh process, 8 fake CPU devices, mesh {MEASURED_MESH}; median time and "
        f"highest peak of {a.repeats} loads each:"
    )
    header = (
        "| path | load s | MB/s read | peak rise | on devices | rise - on devices | vs single |"
    )
    print(header + "\n|" + "---|" * 7)
    for label, r in runs.items():
        read = plans[label]["read_bytes"] if label in plans else file_bytes
        r["read_bytes"] = read
        r["rate"] = read / r["seconds"]
        excess = r["rise"] - r["resident"]
        ratio = f"{r['seconds'] / base['seconds']:.2f}x time, "
        ratio += f"{excess / max(base['rise'] - base['resident'], 1):.2f}x excess"
        print(
            f"| {label} | {r['seconds']:.1f} | {r['rate'] / 1e6:.0f} | {_gb(r['rise'])} | "
            f"{_gb(r['resident'])} | {_gb(excess)} | {ratio} |"
        )
    for preset in PRESETS:
        r, bound = runs[preset], plans[preset]["bound_bytes"]
        print(
            f"{preset}: rise above the device bytes {_gb(r['rise'] - r['resident'])}, bound "
            f"{_gb(bound)} (largest block + 3 x largest tensor part in fp32); largest parameter "
            f"{_gb(r['largest'])}"
        )

    release = mimo_jax.mimo_v2_flash(param_dtype="bfloat16")
    rate = min(runs[pr]["rate"] for pr in PRESETS)
    baseline = max(r["baseline"] for r in runs.values())
    # The bound counts the loader's arrays only; what it misses here (allocator slack, mapped
    # file pages) scales the estimate, never shrinks it.
    excess = [
        (runs[pr]["rise"] - runs[pr]["resident"]) / plans[pr]["bound_bytes"] for pr in PRESETS
    ]
    slack = max(1.0, *excess)
    estimates = {}
    if a.quick:
        print("\n(--quick: the model is too small for this estimate to mean anything)")
    print(
        f"\nESTIMATE for the released checkpoint, from the CPU measurements above (slowest "
        f"sharded rate {rate / 1e6:.0f} MB/s of file bytes per host, dequantization on one "
        f"core; host memory = process baseline before loading {_gb(baseline)} + "
        f"{slack:.2f} (the most the measured rise exceeded it) x the bound):"
    )
    print("| target | preset | files read / host | time / host | host memory / host "
          "| device memory / device |\n|" + "---|" * 6)  # fmt: skip
    for target, (mesh, per_host) in TARGETS.items():
        for preset in PRESETS:
            plan = host_plan(release, mesh, preset, per_host)
            est = dict(
                mesh=mesh,
                devices_per_host=per_host,
                read_bytes=plan["read_bytes"],
                seconds=plan["read_bytes"] / rate,
                host_bytes=baseline + slack * plan["bound_bytes"],
                device_bytes=plan["device_bytes"],
            )
            estimates[f"{target} {preset}"] = est
            print(
                f"| {target} {mesh} | {preset} | {_gb(est['read_bytes'])} | "
                f"{est['seconds'] / 60:.0f} min | {_gb(est['host_bytes'])} | "
                f"{_gb(est['device_bytes'])} |"
            )
    print(
        f"release: {_gb(plan['file_bytes'])} of hub files, "
        f"{_gb(plan['param_bytes'])} of bf16 parameters (MTP included), largest "
        f"parameter {_gb(plan['largest_param_bytes'])}: today's single-device path holds that "
        f"whole parameter on the host and every parameter on one device."
    )
    if a.out:
        result = dict(
            host=common.host_info(),
            file_bytes=file_bytes,
            runs=runs,
            bound_slack=slack,
            estimates=estimates,
        )
        common.write_json(result, a.out)


if __name__ == "__main__":
    main()
