"""Reading hub safetensors tensors, whole or as the slice one device holds.

``mimo_jax.hf`` decides which hub tensor fills which parameter (its ``Entry`` table); this module
reads them: ``Checkpoint`` is a lazy, memory-mapped view of a checkpoint directory,
``check_tensor`` validates one tensor (shape, dtype, FP8 block scales) before anything is read,
and ``sharded_leaf`` builds one parameter directly in its sharded layout, each device's shard
from only the file bytes that shard needs (docs/hf_conversion.md, "Loading onto a mesh").

The leaf layout of a linear weight is ``[*in, *out]`` (e.g. q_proj ``[D, N, H]``) while the file
holds ``[out, in]`` (``[N * H, D]``), and per-expert / per-layer file tensors stack into leading
leaf dims (``Entry.index``). A device's slice of the leaf is a box of index ranges; its rows and
columns in the file tensor are the flattened products of those ranges. The reader takes the
smallest row range x column range covering them, which is exactly the slice when only the
leading dim of a multi-dim group is split (heads but not head_dim, as every preset in
``mimo_jax.sharding`` does) and at worst the whole tensor (one tensor at a time).
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from mimo_jax import fp8

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}

# (block scales [S, ceil(C / 128)] float32, scale row of each weight row [R] int), or None for a
# tensor stored unquantized.
Quant = tuple[np.ndarray, np.ndarray] | None


class Checkpoint:
    """Lazy view of the tensors in a HF checkpoint directory (single file or sharded)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
        # name -> file, dtype, shape, offset of the data
        self.meta: dict[str, tuple[str, str, list[int], int]] = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath):
                raise FileNotFoundError(f"{path}: {INDEX_FILE} lists {fname}, which is missing")
            with open(fpath, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.meta:
                    raise ValueError(f"{path}: tensor {name!r} appears in two files")
                start = 8 + n + info["data_offsets"][0]
                self.meta[name] = (fpath, info["dtype"], list(info["shape"]), start)

    def dtype(self, name: str) -> str:
        return self.meta[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name][2])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (memory-mapped; float8 via ml_dtypes)."""
        fpath, dtype, shape, start = self.meta[name]
        if dtype in FP8_DTYPES:
            # numpy has no float8, so safetensors' numpy loader cannot read it; map the bytes.
            return np.memmap(fpath, FP8_DTYPES[dtype], "r", start, tuple(shape))
        with safe_open(fpath, framework="numpy") as f:
            return f.get_tensor(name)

    def read_box(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
        """A copy of ``tensor[box]``, read through a memory map: only the box's bytes are touched.

        Args:
          name: a float or FP8 tensor.
          box: one ``slice`` (step 1) per dim.

        Returns:
          The box, in the file's dtype (float8 / bfloat16 via ml_dtypes).
        """
        fpath, dtype, shape, start = self.meta[name]
        np_dtype = FP8_DTYPES.get(dtype) or FLOAT_DTYPES[dtype]
        return np.array(np.memmap(fpath, np_dtype, "r", start, tuple(shape))[box])


def block_scales(ckpt: Checkpoint, name: str, entry: Any) -> tuple[np.ndarray, np.ndarray]:
    """The block scales of an FP8 weight and, per weight row, which scale row applies.

    Args:
      ckpt: the checkpoint.
      name: an FP8 weight.
      entry: its ``mimo_jax.hf.Entry`` (``entry.kv`` tells whether the fused K|V layout applies).

    Returns:
      ([S, ceil(C / 128)] float32, [R] int): for k_proj and v_proj in the fused K|V layout the
      scales are both tensors' scales, k_proj's first (mimo_jax/fp8.py); otherwise the tensor's
      own scale read in plain 128x128 blocks.

    Raises:
      ValueError: naming the scale, its dtype and shape, and the shapes accepted.
    """
    scale_name = fp8.scale_name(name)
    rows, cols = ckpt.shape(name)
    want = (fp8.num_blocks(rows), fp8.num_blocks(cols))
    found = (ckpt.dtype(scale_name), ckpt.shape(scale_name))
    accepted = f"F32 {want} (128x128 blocks)"
    kv = entry.kv
    fused = kv.fused_scale_rows() if kv is not None else None
    if fused is not None:
        k_scale, v_scale = fp8.scale_name(kv.k_name), fp8.scale_name(kv.v_name)
        want_k, want_v = ((n, want[1]) for n in fused)
        other, want_other = (v_scale, want_v) if name == kv.k_name else (k_scale, want_k)
        if all(
            s in ckpt.meta and ckpt.dtype(s) == "F32" and ckpt.shape(s) == w
            for s, w in ((k_scale, want_k), (v_scale, want_v))
        ):
            scales = np.concatenate([ckpt.read(k_scale), ckpt.read(v_scale)])
            return scales, kv.fused_rows(name)
        other_found = f"{ckpt.dtype(other)} {ckpt.shape(other)}" if other in ckpt.meta else "absent"
        accepted += (
            f", or F32 {want_k if name == kv.k_name else want_v} with {other!r} F32 {want_other} "
            f"(K and V rows of each KV head quantized as one fused matrix; it is {other_found})"
        )
    if found != ("F32", want):
        raise ValueError(
            f"checkpoint tensor {scale_name!r} is {found[0]} {found[1]}, expected {accepted}"
        )
    return ckpt.read(scale_name), np.arange(rows) // fp8.FP8_BLOCK


def check_tensor(ckpt: Checkpoint, name: str, entry: Any) -> Quant:
    """Checks one tensor's shape and dtype (and scales, if FP8); returns how to dequantize it.

    Whether a tensor is quantized is told by its dtype and scale alone, not by the config's
    ``quantization_config.ignored_layers``: the release's MTP o_proj are bf16 without a scale
    although that list names only the main layers' o_proj.

    Args:
      ckpt: the checkpoint.
      name: the tensor's hub name.
      entry: its ``mimo_jax.hf.Entry``.

    Returns:
      ``block_scales`` of an FP8 tensor; None for a float one.

    Raises:
      ValueError: naming a misshaped or wrongly typed tensor or scale.
    """
    shape, dtype = ckpt.shape(name), ckpt.dtype(name)
    if shape != entry.hf_shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {shape}, expected {entry.hf_shape}")
    scale_name = fp8.scale_name(name)
    if dtype not in FP8_DTYPES and scale_name in ckpt.meta:
        # A scale on an unquantized tensor means the file is not what we think it is; applying
        # or ignoring it would both be guesses.
        raise ValueError(
            f"checkpoint tensor {scale_name!r} exists but {name!r} is {dtype}, not FP8"
        )
    if dtype in FP8_DTYPES:
        if not entry.quantized:
            raise ValueError(f"checkpoint tensor {name!r} is {dtype}, but it is never quantized")
        if scale_name not in ckpt.meta:
            raise ValueError(f"checkpoint tensor {name!r} is {dtype} but {scale_name!r} is missing")
        return block_scales(ckpt, name, entry)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"checkpoint tensor {name!r} has dtype {dtype}; expected one of "
            f"{sorted(FLOAT_DTYPES) + sorted(FP8_DTYPES)}"
        )
    return None


# ---------------------------------------------------------------------------------------------
# One device's slice.


def _flat(dims: Sequence[int], ranges: Sequence[range]) -> np.ndarray:
    """Row-major flat indices, into ``prod(dims)``, of the box ``ranges`` of a ``dims`` array.

    Returns:
      [prod(len(r))] int64, increasing.
    """
    flat = np.zeros((), np.int64)
    for size, r in zip(dims, ranges, strict=True):
        flat = flat[..., None] * size + np.arange(r.start, r.stop)
    return flat.reshape(-1)


def dequantize_box(
    w: np.ndarray, quant: tuple[np.ndarray, np.ndarray], rows: slice, cols: slice
) -> np.ndarray:
    """``fp8.dequantize_rows`` of the box ``W[rows, cols]`` alone, bit for bit.

    The box may start and end inside a 128-block: each column takes its own block's scale.

    Args:
      w: [r1 - r0, c1 - c0] float8_e4m3fn, the box.
      quant: the whole tensor's ``block_scales``.
      rows, cols: where the box sits in the tensor.

    Returns:
      [r1 - r0, c1 - c0] float32.
    """
    scales, row_map = quant
    block = fp8.FP8_BLOCK
    out = w.astype(np.float32)
    s = scales.astype(np.float32)[row_map[rows]]  # [r1 - r0, S_cols]
    for j in range(cols.start // block, fp8.num_blocks(cols.stop, block)):
        lo, hi = max(cols.start, j * block), min(cols.stop, (j + 1) * block)
        out[:, lo - cols.start : hi - cols.start] *= s[:, j : j + 1]
    return out


def entry_part(
    ckpt: Checkpoint,
    name: str,
    entry: Any,
    quant: Quant,
    sub_shape: tuple[int, ...],
    ranges: Sequence[range],
) -> np.ndarray:
    """The part ``ranges`` of one hub tensor in leaf layout, read and dequantized alone.

    Args:
      ckpt: the checkpoint.
      name: the tensor.
      entry: its ``Entry``.
      quant: its ``check_tensor`` result.
      sub_shape: the tensor's shape in leaf layout (the leaf's dims after ``entry.index``).
      ranges: one index range per dim of ``sub_shape``.

    Returns:
      [len(r) for r in ranges], float32 if FP8, otherwise the file's dtype.
    """
    if not entry.n_in:
        if tuple(entry.hf_shape) == tuple(sub_shape):
            return ckpt.read_box(name, tuple(slice(r.start, r.stop) for r in ranges))
        whole = ckpt.read_box(name, (slice(None),) * len(entry.hf_shape)).reshape(sub_shape)
        return whole[tuple(slice(r.start, r.stop) for r in ranges)]
    n = entry.n_in
    cols = _flat(sub_shape[:n], ranges[:n])  # [in part]
    rows = _flat(sub_shape[n:], ranges[n:])  # [out part]
    row_box, col_box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    x = ckpt.read_box(name, (row_box, col_box))  # [r1 - r0, c1 - c0]
    if quant is not None:
        x = dequantize_box(x, quant, row_box, col_box)
    x = x.T  # [c1 - c0, r1 - r0]
    if len(cols) != x.shape[0] or len(rows) != x.shape[1]:
        x = x[np.ix_(cols - cols[0], rows - rows[0])]
    return x.reshape([len(r) for r in ranges])


def sharded_leaf(
    ckpt: Checkpoint,
    shape: tuple[int, ...],
    dtype: np.dtype,
    sharding: jax.sharding.Sharding,
    parts: Sequence[tuple[str, Any, Quant]],
) -> jax.Array:
    """One parameter, built shard by shard from the hub tensors that map into it.

    Each distinct shard this process's devices hold is assembled on the host from
    ``entry_part`` of every hub tensor whose ``entry.index`` falls in it, put on the devices
    that hold it, and dropped: the host holds one shard plus one file tensor's box (in float32
    if FP8) at a time, never the whole parameter, and replicas are read once per process.

    Args:
      ckpt: the checkpoint.
      shape: the parameter's shape.
      dtype: its dtype (each part is cast to it, as the single-device load casts).
      sharding: where it goes.
      parts: (hub name, Entry, check_tensor result) of every tensor that maps into it.

    Returns:
      The parameter, laid out by ``sharding``.
    """

    def shard(ranges: Sequence[range]) -> np.ndarray:
        out = np.empty([len(r) for r in ranges], dtype)
        for name, entry, quant in parts:
            k = len(entry.index)
            if not all(i in r for i, r in zip(entry.index, ranges[:k], strict=True)):
                continue
            at = tuple(i - r.start for i, r in zip(entry.index, ranges[:k], strict=True))
            out[at] = entry_part(ckpt, name, entry, quant, shape[k:], ranges[k:]).astype(dtype)
        return out

    devices_of: dict[tuple[range, ...], list[jax.Device]] = {}
    index_map = sharding.addressable_devices_indices_map(shape)
    for device, index in index_map.items():
        ranges = tuple(range(*s.indices(n)) for s, n in zip(index, shape, strict=True))
        devices_of.setdefault(ranges, []).append(device)
    arrays = {}
    for ranges, devices in devices_of.items():
        host = shard(ranges)
        arrays.update((d, jax.device_put(host, d)) for d in devices)
        del host  # before the next shard is built: one shard on the host at a time
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in index_map])
