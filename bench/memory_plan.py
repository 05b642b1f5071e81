"""Per-device memory of MiMo-V2-Flash under each sharding preset, from compiled programs.

    python bench/memory_plan.py                  # configs/mimo_v2_flash.py on 256 fake devices
    python bench/memory_plan.py --quick          # a tiny config on 8 devices (seconds)
    python bench/memory_plan.py --token_chunk=0 --loss_chunk=0   # without the memory chunking

Nothing is allocated: the model, optimizer state, batch and KV cache are ``ShapeDtypeStruct``s
with the preset's shardings, the training step and a decode step are lowered and compiled for a
mesh of N (fake CPU) devices, and XLA's memory analysis gives each device's temporary bytes
(activations and workspace). Parameter, optimizer and KV-cache bytes per device are summed from
shapes and PartitionSpecs: those are exact.

The MoE runs as ``expert_parallel`` under every preset (with one expert shard under ``fsdp``). Its
grouped matmul is replaced by a single dense matmul of the same shapes ([R, D] x [D, M] -> [R, M]):
XLA:CPU cannot express a grouped GEMM (it lowers ``ragged_dot`` to a dot against every expert,
and our CPU path gathers a weight copy per row block), so compiling either would report CPU
artefacts, while a grouped GEMM on GPU/TPU holds exactly the [R, M] outputs this proxy holds.
Temporaries remain indicative: the CPU compiler schedules and fuses differently from XLA:GPU/TPU.
"""

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fake devices must exist before jax is imported.
_devices = 8 if "--quick" in sys.argv else 256
for i, arg in enumerate(sys.argv):
    if arg.startswith("--devices"):
        _devices = int(arg.split("=")[1] if "=" in arg else sys.argv[i + 1])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices}"
)
sys.path.insert(0, REPO)

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import mimo_jax  # noqa: E402
from configs import mimo_v2_flash as production  # noqa: E402
from configs.base import base_config  # noqa: E402
from mimo_jax import axes as ax  # noqa: E402
from mimo_jax import layout, train  # noqa: E402
from mimo_jax import sharding as sh  # noqa: E402
from mimo_jax.model import MiMoV2Flash  # noqa: E402

GiB = 2**30


def _fmt(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / 2**20:8.2f} MiB"


# Default meshes of 256 devices (data, fsdp, expert, tensor); scaled down for --devices < 256.
MESHES = {
    "fsdp": (1, -1, 1, 1),
    "fsdp_ep": (1, -1, 16, 1),
    "tp_ep": (1, -1, 16, 4),
    "decode": (1, -1, 16, 4),
}
QUICK_MESHES = {p: (1, -1, 2, 2) if p in ("tp_ep", "decode") else (1, -1, 4, 1) for p in MESHES}


def _cache_bytes_per_device(cache, specs, mesh) -> int:
    """Bytes of the KV cache pytree each device holds under its PartitionSpecs."""
    leaves = zip(jax.tree.leaves(cache), jax.tree.leaves(specs), strict=True)
    return sum(
        math.prod(layout.shard_shape(x.shape, p, mesh)) * x.dtype.itemsize for x, p in leaves
    )


def _with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _cache_specs(cache):
    """KV cache layout (as ``KVCache.constrained``): batch and kv heads sharded."""

    def spec(path, x):
        lead = (None,) * (x.ndim - (2 if path[-1].name == "pos" else 4))  # scanned: repeats axis
        axes = (ax.BATCH, None) if path[-1].name == "pos" else (ax.BATCH, None, ax.KV_HEADS, None)
        return ax.logical_to_spec(lead + axes)

    return jax.tree_util.tree_map_with_path(spec, cache)


def _grouped_gemm_proxy(x, w, group_sizes):
    """Same shapes and dtypes as a grouped GEMM (see the module docstring)."""
    del group_sizes
    return jnp.dot(x, w[0])  # [R, M]


def plan(cfg, tc, preset: str, mesh_shape, *, batch: int, seq_len: int, decode_batch: int,
         context: int) -> dict:  # fmt: skip
    """Per-device bytes of one preset: parameters, optimizer, training temporaries, KV cache,
    decode-step temporaries.

    Args:
      cfg: model config (run with ``moe_impl="expert_parallel"``).
      tc: ``config.train`` (optimizer, ``loss_chunk``).
      preset: sharding rule preset.
      mesh_shape: (data, fsdp, expert, tensor).
      batch: training sequences per step.
      seq_len: training sequence length.
      decode_batch: decoding sequences.
      context: decode cache length.

    Returns:
      dict of per-device bytes (``params``, ``optimizer``, ``train_temp``, ``kv_cache``,
      ``decode_temp``), compile seconds and the mesh.
    """
    cfg = dataclasses.replace(cfg, moe_impl="expert_parallel")
    mimo_jax.moe.grouped_matmul = _grouped_gemm_proxy
    mesh = sh.make_mesh(mesh_shape)
    out = {"preset": preset, "mesh": dict(mesh.shape)}
    with sh.use_mesh(mesh, preset):
        model, opt = nnx.eval_shape(
            lambda: (m := MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), train.make_optimizer(m, tc))
        )
        graphdef, state = nnx.split((model, opt))
        specs = sh.param_specs(state)
        shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), specs)
        out["params"] = layout.param_bytes_per_device(model, mesh)
        out["optimizer"] = layout.param_bytes_per_device(opt.opt_state, mesh)

        t0 = time.perf_counter()
        step = train.make_train_step(graphdef, cfg, tc, shardings)
        tokens = jax.ShapeDtypeStruct(
            (1, batch, seq_len + 1), jnp.int32, sharding=sh.batch_sharding(3, batch_dim=1)
        )
        compiled = step.lower(_with_shardings(state, shardings), tokens).compile()
        out["train_temp"] = compiled.memory_analysis().temp_size_in_bytes
        out["train_compile_s"] = time.perf_counter() - t0

        model_gd, model_state = nnx.split(model)
        cache = jax.eval_shape(lambda: model.init_cache(decode_batch, context, 2))
        cache_sh = jax.tree.map(lambda p: NamedSharding(mesh, p), _cache_specs(cache))
        out["kv_cache"] = _cache_bytes_per_device(cache, _cache_specs(cache), mesh)

        def decode_step(state, cache, ids, positions):  # one new token against the cache
            m = nnx.merge(model_gd, state)
            h, _, cache = m.decoder(m.embed_tokens(ids), positions, None, cache)
            return m.lm_head(m.norm(h)), cache

        ids = jax.ShapeDtypeStruct((decode_batch, 1), jnp.int32, sharding=sh.batch_sharding(2))
        state_sh = jax.tree.map(lambda p: NamedSharding(mesh, p), sh.param_specs(model_state))
        t0 = time.perf_counter()
        compiled = (
            jax.jit(decode_step, donate_argnums=1)
            .lower(
                _with_shardings(model_state, state_sh), _with_shardings(cache, cache_sh), ids, ids
            )  # fmt: skip
            .compile()
        )
        out["decode_temp"] = compiled.memory_analysis().temp_size_in_bytes
        out["decode_compile_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config on 8 devices")
    p.add_argument("--devices", type=int, default=_devices)
    p.add_argument("--presets", default=",".join(MESHES))
    p.add_argument("--batch", type=int, default=0, help="training sequences (0: one per shard)")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--decode_batch", type=int, default=0, help="0: one sequence per batch shard")
    p.add_argument("--context", type=int, default=262144, help="decode cache length")
    p.add_argument(
        "--capacity_factor",
        type=float,
        default=None,
        help="EP capacity (0: dropless); default: the config's",
    )
    p.add_argument(
        "--token_chunk",
        type=int,
        default=None,
        help="EP tokens per device per dispatch (0: all); default: the config's",
    )
    p.add_argument(
        "--loss_chunk",
        type=int,
        default=None,
        help="cross-entropy positions per chunk (0: whole); default: the config's",
    )
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "memory_plan.json"))
    args = p.parse_args(argv)
    if args.quick:
        cfg = mimo_jax.tiny(num_layers=3, num_kv_heads=2, num_mtp_layers=1)
        tc = base_config().train
        args.seq_len, args.context, meshes = 64, 256, QUICK_MESHES
    else:
        config = production.get_config()
        cfg, tc = train.model_config(config), config.train
        meshes = MESHES
    overrides = {"moe_capacity_factor": args.capacity_factor, "moe_token_chunk": args.token_chunk}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.loss_chunk is not None:
        tc.loss_chunk = args.loss_chunk
    print(f"param_dtype {cfg.param_dtype}, remat {cfg.remat}, moe_capacity_factor "
          f"{cfg.moe_capacity_factor}, moe_token_chunk {cfg.moe_token_chunk}, "
          f"train.loss_chunk {tc.loss_chunk}", flush=True)  # fmt: skip
    rows = []
    for preset in args.presets.split(","):
        mesh_shape = meshes[preset]
        mesh = sh.make_mesh(mesh_shape)
        with sh.use_mesh(mesh, preset):
            shards = math.prod(mesh.shape[a] for a in ax.mesh_axes(ax.BATCH))
        row = plan(cfg, tc, preset, mesh_shape, batch=args.batch or shards, seq_len=args.seq_len,
                   decode_batch=args.decode_batch or shards, context=args.context)  # fmt: skip
        rows.append(row)
        print(
            f"{preset:8s} mesh {tuple(row['mesh'].values())!s:18s} per device: "
            f"params {_fmt(row['params'])} | optimizer {_fmt(row['optimizer'])}"
            f" | train activations+temp {_fmt(row['train_temp'])}"
            f" | KV cache {_fmt(row['kv_cache'])} | decode temp {_fmt(row['decode_temp'])}"
            f"   (compile {row['train_compile_s']:.0f}s + {row['decode_compile_s']:.0f}s)",
            flush=True,
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"devices": args.devices, "seq_len": args.seq_len, "context": args.context,
                       "capacity_factor": cfg.moe_capacity_factor,
                       "token_chunk": cfg.moe_token_chunk, "loss_chunk": tc.loss_chunk,
                       "param_dtype": cfg.param_dtype, "rows": rows}, f,
                      indent=2)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
