"""HF safetensors <-> NNX state, streamed tensor by tensor.

The checkpoint format is the one on the hub (and what transformers' ``save_pretrained`` writes):
per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, ``self_attn.attention_sink_bias``,
MTP blocks under ``model.mtp.layers.{k}.*`` (transformers itself ignores those), PyTorch
``[out, in]`` weights, optionally FP8 e4m3 with ``weight_scale_inv`` block scales (mimo_jax/fp8.py).

Memory: ``load_hf`` builds the model abstractly and fills one parameter array at a time from
memory-mapped files. On one device the host holds at most one stacked parameter (for the released
model the largest is one scanned expert weight, 7 x 256 x 4096 x 2048 x 2 bytes = 30 GB in bf16)
plus one file tensor. Under ``sharding.use_mesh`` each parameter is created in its sharded layout,
each device's shard read from only its part of the files (``mimo_jax.hf_slices``), so the host
holds one device shard plus one file tensor's slice at a time. ``save_hf`` gathers one tensor
at a time to the host, from any mesh and across processes, and fills one file (default 4 GB) at
a time.
"""

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from mimo_jax import fp8, hf_slices, sharding
from mimo_jax.axes import current_rules
from mimo_jax.hf_config import config_from_hf, config_to_hf
from mimo_jax.hf_slices import INDEX_FILE, Checkpoint, check_tensor
from mimo_jax.model import MiMoV2Flash
from mimo_jax.progress import Progress


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one HF tensor maps onto the model state.

    Attributes:
      path: key path of the nnx.State leaf.
      index: leading indices into that leaf (scan repeat and/or expert).
      hf_shape: shape of the HF tensor.
      n_in: for linear weights, how many of the leaf's (trailing) dims are inputs; 0 = copy as is.
      quantized: whether the tensor may be stored block-quantized (FP8).
      kv: for k_proj and v_proj, the pair whose scales may use the fused K|V layout.
    """

    path: tuple
    index: tuple[int, ...]
    hf_shape: tuple[int, ...]
    n_in: int = 0
    quantized: bool = False
    kv: fp8.FusedKV | None = None


def _linear(path, index, in_shape, out_shape, n_in=1, quantized=True, kv=None) -> Entry:
    return Entry(path, index, (math.prod(out_shape), math.prod(in_shape)), n_in, quantized, kv)


def _attention_entries(cfg, prefix, path, index, sliding) -> dict[str, Entry]:
    n, h, p, d = cfg.num_heads, cfg.head_dim, cfg.v_head_dim, cfg.embed_dim
    k = cfg.swa_num_kv_heads if sliding else cfg.num_kv_heads
    k_name, v_name = f"{prefix}.k_proj.weight", f"{prefix}.v_proj.weight"
    kv = fp8.FusedKV(k_name, v_name, k, h, p)
    out = {
        f"{prefix}.q_proj.weight": _linear(path + ("q_proj", "kernel"), index, (d,), (n, h)),
        k_name: _linear(path + ("k_proj", "kernel"), index, (d,), (k, h), kv=kv),
        v_name: _linear(path + ("v_proj", "kernel"), index, (d,), (k, p), kv=kv),
        # o_proj is bf16 in the released checkpoint (not quantized), but accept FP8 anyway.
        f"{prefix}.o_proj.weight": _linear(path + ("o_proj", "kernel"), index, (n, p), (d,), 2),
    }
    if cfg.swa_attention_sink if sliding else cfg.full_attention_sink:
        out[f"{prefix}.attention_sink_bias"] = Entry(path + ("sinks",), index, (n,))
    return out


def _mlp_entries(prefix, path, index, d, f) -> dict[str, Entry]:
    return {
        f"{prefix}.gate_proj.weight": _linear(path + ("gate_proj", "kernel"), index, (d,), (f,)),
        f"{prefix}.up_proj.weight": _linear(path + ("up_proj", "kernel"), index, (d,), (f,)),
        f"{prefix}.down_proj.weight": _linear(path + ("down_proj", "kernel"), index, (f,), (d,)),
    }


def hf_entries(model: MiMoV2Flash) -> dict[str, Entry]:
    """The full HF tensor table of a model (hub names, scales excluded)."""
    cfg = model.cfg
    d, e = cfg.embed_dim, cfg.num_experts
    norm = lambda path, index: Entry(path + ("scale",), index, (d,))  # noqa: E731
    table = {
        "model.embed_tokens.weight": Entry(("embed_tokens", "embedding"), (), (cfg.vocab_size, d)),
        "model.norm.weight": norm(("norm",), ()),
        "lm_head.weight": _linear(
            ("lm_head", "kernel"), (), (d,), (cfg.vocab_size,), quantized=False
        ),
    }
    for i in range(cfg.num_layers):
        where, j, r = model.plan.locate(i)
        path = ("scanned", j) if where == "scanned" else ("layers", j)
        idx = () if r is None else (r,)
        pre = f"model.layers.{i}"
        table[f"{pre}.input_layernorm.weight"] = norm(path + ("input_layernorm",), idx)
        table[f"{pre}.post_attention_layernorm.weight"] = norm(
            path + ("post_attention_layernorm",), idx
        )
        sliding = cfg.layer_types[i] == "sliding_attention"
        table.update(
            _attention_entries(cfg, f"{pre}.self_attn", path + ("self_attn",), idx, sliding)
        )
        if cfg.mlp_layer_types[i] == "dense":
            table.update(_mlp_entries(f"{pre}.mlp", path + ("mlp",), idx, d, cfg.mlp_dim))
            continue
        mlp = path + ("mlp",)
        table[f"{pre}.mlp.gate.weight"] = _linear(
            mlp + ("router", "kernel"), idx, (d,), (e,), quantized=False
        )
        table[f"{pre}.mlp.gate.e_score_correction_bias"] = Entry(
            mlp + ("router", "bias"), idx, (e,)
        )
        m = cfg.moe_mlp_dim
        for x in range(e):
            ep = f"{pre}.mlp.experts.{x}"
            table[f"{ep}.gate_proj.weight"] = _linear(mlp + ("wi_gate",), idx + (x,), (d,), (m,))
            table[f"{ep}.up_proj.weight"] = _linear(mlp + ("wi_up",), idx + (x,), (d,), (m,))
            table[f"{ep}.down_proj.weight"] = _linear(mlp + ("wo",), idx + (x,), (m,), (d,))
    for k in range(cfg.num_mtp_layers):
        pre, path = f"model.mtp.layers.{k}", ("mtp", k)
        for name in ("enorm", "hnorm", "input_layernorm", "final_layernorm"):
            table[f"{pre}.{name}.weight"] = norm(path + (name,), ())
        # Megatron's name for the post-attention norm, kept by the released checkpoint.
        table[f"{pre}.pre_mlp_layernorm.weight"] = norm(path + ("post_attention_layernorm",), ())
        table[f"{pre}.eh_proj.weight"] = _linear(path + ("eh_proj", "kernel"), (), (2 * d,), (d,))
        table.update(_attention_entries(cfg, f"{pre}.self_attn", path + ("self_attn",), (), True))
        table.update(_mlp_entries(f"{pre}.mlp", path + ("mlp",), (), d, cfg.mlp_dim))
    return table


# ---------------------------------------------------------------------------------------------
# Reading.


def _read_checked(ckpt: Checkpoint, name: str, entry: Entry) -> np.ndarray:
    """Reads one tensor, checking it (``hf_slices.check_tensor``), dequantizing FP8.

    Returns:
      The tensor as stored ([out, in] or a vector), float32 if FP8, otherwise the file's dtype.
    """
    quant = check_tensor(ckpt, name, entry)
    x = ckpt.read(name)
    return x if quant is None else fp8.dequantize_rows(x, *quant)


def _to_leaf_layout(x: np.ndarray, entry: Entry, leaf_shape: tuple[int, ...]) -> np.ndarray:
    """HF [out, in] (or a vector) -> our kernel layout [*in, *out] for the indexed slice."""
    sub = leaf_shape[len(entry.index) :]
    if entry.n_in:
        return np.ascontiguousarray(x.T).reshape(sub)
    return x.reshape(sub)


def _from_leaf_layout(x: np.ndarray, entry: Entry) -> np.ndarray:
    """Our slice -> HF layout."""
    if entry.n_in:
        n_in = math.prod(x.shape[: entry.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)
    return x.reshape(entry.hf_shape)


def _leaves(state) -> dict[tuple, nnx.Variable]:
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _count_mtp_layers(names) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(r"model\.mtp\.layers\.(\d+)\.", n))}
    if found and found != set(range(len(found))):
        raise ValueError(f"checkpoint MTP layers are not numbered 0..k-1: found {sorted(found)}")
    return len(found)


def load_hf(path: str, **overrides) -> MiMoV2Flash:
    """Loads a HF checkpoint directory (config.json + safetensors) into a MiMoV2Flash.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (optionally sharded with
        ``model.safetensors.index.json``); FP8 e4m3 weights with ``weight_scale_inv`` are
        dequantized.
      **overrides: ModelConfig fields to set (e.g. ``param_dtype="float32"``, ``moe_impl``).
        ``param_dtype`` defaults to the config's ``torch_dtype``/``dtype``.

    Called under ``sharding.use_mesh(mesh, preset)``, every parameter is created directly in
    the layout ``sharding.create_model`` gives it: each of this process's devices gets its shard
    assembled from only the rows / columns of the file tensors it needs (FP8 dequantized for that
    part alone; a shard may cut a 128-block), so host memory beyond the memory-mapped files is
    one device shard plus one file tensor's slice (float32 if FP8) at a time, never a whole
    parameter. Values are bit for bit those of the single-device load.

    Returns:
      The model (sharded under a mesh, on the default device otherwise).

    Raises:
      ValueError: on a malformed config, or a missing, extra, misshaped or wrongly typed tensor
        (the message names it), all checked before any weight is read; under a mesh, also on a
        mesh that does not divide a sharded dim.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    ckpt = Checkpoint(path)
    stored = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")
    defaults = {}
    if stored in ("float32", "bfloat16", "float16"):
        defaults = {
            "param_dtype": stored,
            "dtype": "float32" if stored == "float32" else "bfloat16",
        }
    if hf_cfg.get("num_nextn_predict_layers") is None:
        defaults["num_mtp_layers"] = _count_mtp_layers(ckpt.meta)
    cfg = config_from_hf(hf_cfg, **{**defaults, **overrides})

    abstract = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    table = hf_entries(abstract)
    scales = {n for n in ckpt.meta if n.endswith(".weight_scale_inv")}
    missing = sorted(set(table) - set(ckpt.meta))
    if missing:
        hint = ""
        if all(n.startswith("model.mtp.") for n in missing):
            # e.g. our export re-saved by transformers: it keeps num_nextn_predict_layers in
            # config.json but drops the MTP weights it does not implement.
            hint = (
                f"; only MTP tensors are missing (config says {cfg.num_mtp_layers} MTP layers): "
                "pass num_mtp_layers=0 to load the main model alone"
            )
        raise ValueError(
            f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}{hint}"
        )
    extra = sorted(set(ckpt.meta) - set(table) - scales)
    orphan = sorted(s for s in scales if s.removesuffix("_scale_inv") not in table)
    if extra or orphan:
        raise ValueError(f"{path}: unexpected tensor(s) in checkpoint: {(extra + orphan)[:5]}")

    for name, entry in table.items():
        check_tensor(ckpt, name, entry)  # every tensor's shape, dtype and scales, before reading

    graphdef, state = nnx.split(abstract)
    leaves = _leaves(state)
    by_leaf: dict[tuple, list[tuple[str, Entry]]] = {}
    for name, entry in table.items():
        by_leaf.setdefault(entry.path, []).append((name, entry))
    mesh = jax.sharding.get_mesh()
    sharded = not mesh.empty and bool(current_rules())
    if sharded:
        sharding.check_divisible(state, mesh)
        shardings = dict(nnx.to_flat_state(sharding.state_shardings(state)))
    progress = Progress("read tensor", len(table), keep=False)
    for leaf_path, var in leaves.items():
        if leaf_path not in by_leaf:
            raise AssertionError(f"no checkpoint tensor maps to parameter {leaf_path}")
        dtype = jnp.dtype(var.dtype)
        if sharded:
            parts = [(n, e, check_tensor(ckpt, n, e)) for n, e in by_leaf[leaf_path]]
            where = shardings[leaf_path].get_value()
            var.set_value(hf_slices.sharded_leaf(ckpt, var.shape, dtype, where, parts))
            progress.update(progress.done + len(parts))
            continue
        buf = np.empty(var.shape, dtype)
        for name, entry in by_leaf[leaf_path]:
            x = _read_checked(ckpt, name, entry)
            buf[entry.index] = _to_leaf_layout(x, entry, var.shape).astype(buf.dtype)
            progress.update(progress.done + 1)
        var.set_value(jnp.asarray(buf))
    progress.close()
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ---------------------------------------------------------------------------------------------
# Writing.


@jax.jit
def _take(x: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
    """``x[index]``, traced indices so one program serves every expert / repeat of a leaf."""
    return x[index]


def _gather(x: jax.Array, index: tuple[int, ...]) -> np.ndarray:
    """``x[index]`` on this host, whatever the devices and processes that hold ``x``.

    The slice is cut on the devices first, so only its bytes travel to the host: for a stacked
    expert leaf, one expert's weight. Across processes every process must call this with the
    same arguments (``process_allgather`` is a collective); each then holds the whole slice.
    """
    if index:
        x = _take(x, tuple(np.int32(i) for i in index))
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: MiMoV2Flash) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every HF tensor, one tensor on the host at a time (never a whole leaf)."""
    leaves = _leaves(nnx.state(model))
    for name, entry in hf_entries(model).items():
        yield name, _from_leaf_layout(_gather(leaves[entry.path][...], entry.index), entry)


def _sibling(path: str, kind: str) -> str:
    """A hidden, unused name next to ``path`` (same filesystem, so renames are atomic)."""
    return os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{secrets.token_hex(6)}"
    )


def save_hf(
    model: MiMoV2Flash, path: str, *, max_shard_bytes: int = 4 << 30, overwrite: bool = False
) -> None:
    """Writes a HF checkpoint that transformers' ``MiMoV2FlashForCausalLM.from_pretrained`` loads.

    The directory appears atomically: everything is written to a temporary sibling and renamed
    into place, so a failed export leaves no partial directory.

    The model may be sharded over a mesh, across processes too: one hub tensor at a time (for a
    stacked expert weight, one expert's slice) is cut on the devices and gathered to the host,
    so host memory is bounded by the safetensors file being filled (at most ``max_shard_bytes``,
    or one tensor if larger), its serialized copy while it is written, and one tensor; never a
    whole parameter. The files are bit for bit those of the same model on one device. With
    several processes every process must call this (the gathers are collectives); process 0
    alone writes, into a directory only it needs to see, and all return once it is in place.

    Args:
      model: the model.
      path: output directory; must not exist unless ``overwrite``.
      max_shard_bytes: upper bound of one safetensors file; more tensors go to further shards,
        listed in ``model.safetensors.index.json``.
      overwrite: replace an existing directory (only after the new one is complete).

    Raises:
      FileExistsError: if ``path`` exists (on process 0) and not ``overwrite``.
    """
    path = os.path.abspath(path)
    writer = jax.process_index() == 0
    exists = os.path.exists(path)
    if jax.process_count() > 1:
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    hf_cfg = config_to_hf(model.cfg)  # validates before any file is written
    if not writer:
        for _ in _hf_tensors(model):
            pass  # the other processes' part of each gather
        multihost_utils.sync_global_devices(f"save_hf {path}")
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the published checkpoint, while a
    # plain mkdir honours the umask. The random suffix keeps concurrent exports apart.
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        _write_tensors(model, tmp, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if os.path.exists(path):
            old = _sibling(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                # Put the previous checkpoint back rather than leave it under a hidden name.
                os.rename(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf {path}")


def _write_tensors(model: MiMoV2Flash, tmp: str, max_shard_bytes: int) -> None:
    """Every hub tensor of ``model`` into safetensors files under ``tmp``, plus their index."""
    shards: list[list[str]] = []
    files: list[str] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal pending, size
        if pending:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(pending, os.path.join(tmp, fname), metadata={"format": "pt"})
            files.append(fname)
            shards.append(list(pending))
            pending, size = {}, 0

    progress = Progress("write tensor", len(hf_entries(model)), keep=False)
    for name, x in _hf_tensors(model):
        if pending and size + x.nbytes > max_shard_bytes:
            flush()
        pending[name] = x
        size += x.nbytes
        total += x.nbytes  # HF's total_size counts tensor bytes, not file sizes
        progress.update(progress.done + 1, f"{len(files)} files written")
    flush()
    progress.close()
    weight_map = {}
    for i, names in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(os.path.join(tmp, files[i]), os.path.join(tmp, new))
        weight_map.update(dict.fromkeys(names, new))
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
