"""Where each array of a sharded state lives, computed from shapes and rules alone.

``describe_shardings`` gives, per parameter (or optimizer moment), its PartitionSpec under a rule
preset, the block one device holds and which mesh positions hold each block;
``param_bytes_per_device`` sums the blocks; ``format_layouts`` prints a table of several presets
side by side. Nothing here needs devices: abstract states (``nnx.eval_shape``) of the real 309B
model on a 256-device mesh are planned on a laptop (``bench/memory_plan.py``, notebook 04).
"""

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from mimo_jax.axes import MESH_AXES, MeshAxes, as_tuple, current_rules
from mimo_jax.sharding import check_divisible, param_specs, rules_for


def _mesh_shape(mesh: Any) -> dict[str, int]:
    """{axis: size} of a Mesh / AbstractMesh, a mapping, four sizes, or (None) the current mesh."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("no mesh given and none is current: pass mesh=, or use use_mesh(...)")
    shape = getattr(mesh, "shape", mesh)
    if isinstance(shape, Mapping):
        shape = {str(a): int(s) for a, s in shape.items()}
    else:
        shape = [int(s) for s in shape]
        if len(shape) != len(MESH_AXES) or min(shape) < 1:
            raise ValueError(f"mesh shape must be {len(MESH_AXES)} positive sizes {MESH_AXES}")
        shape = dict(zip(MESH_AXES, shape, strict=True))
    unknown = [a for a in MESH_AXES if a not in shape]
    if unknown:
        raise ValueError(f"mesh {shape} lacks the axes {unknown}")
    return shape


def _padded_spec(spec: PartitionSpec | None, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Mesh axes per dim (a tuple per dim, () = not split), padded to ``ndim`` dims."""
    entries = tuple(spec or ())
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the array's {ndim} dims")
    return tuple(as_tuple(e) for e in entries) + ((),) * (ndim - len(entries))


def shard_shape(
    shape: Sequence[int], spec: PartitionSpec | None, mesh: Any = None
) -> tuple[int, ...]:
    """Shape of the block each device holds of an array of ``shape`` laid out by ``spec``.

    A dim split n ways holds ceil(size / n) (JAX pads the last block of an indivisible dim).

    Args:
      shape: the global array shape.
      spec: its PartitionSpec (mesh axes per dim; None = replicated).
      mesh: a Mesh / AbstractMesh, {axis: size}, four sizes (data, fsdp, expert, tensor), or
        None for the current mesh.

    Returns:
      The per-device shape, same rank as ``shape``.
    """
    sizes = _mesh_shape(mesh)
    axes = _padded_spec(spec, len(shape))
    splits = [math.prod(sizes[a] for a in ax) for ax in axes]
    return tuple(-(-d // n) for d, n in zip(shape, splits, strict=True))  # ceil


def block_devices(ndim: int, spec: PartitionSpec | None, mesh: Any = None) -> np.ndarray:
    """Which devices hold which block of an array laid out by ``spec``.

    Devices are numbered by their position in the mesh (row-major over the mesh axes, i.e.
    ``mesh.devices.flat`` order), so this needs only the mesh shape. Along a dim split over
    several axes, the first axis is the major one (JAX's convention).

    Args:
      ndim: rank of the array.
      spec: its PartitionSpec.
      mesh: as in ``shard_shape``.

    Returns:
      int [n_0, ..., n_{ndim-1}, R]: n_i blocks along dim i; entry [b_0, ..., b_{ndim-1}, :] lists,
      ascending, the R mesh positions that hold block (b_0, ..., b_{ndim-1}) (R > 1 = replicas).
    """
    sizes = _mesh_shape(mesh)
    names = list(sizes)
    coords = np.indices([sizes[a] for a in names]).reshape(len(names), -1)  # [axes, devices]
    blocks, counts = [], []
    for ax in _padded_spec(spec, ndim):
        b, n = np.zeros(coords.shape[1], np.int64), 1
        for a in ax:  # mixed radix, first axis major
            b = b * sizes[a] + coords[names.index(a)]
            n *= sizes[a]
        blocks.append(b)
        counts.append(n)
    flat = np.ravel_multi_index(blocks, counts) if ndim else np.zeros(coords.shape[1], np.int64)
    order = np.argsort(flat, kind="stable")  # devices grouped by block, ascending within a block
    return order.reshape(*counts, -1)


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare the devices arrays
class ParamLayout:
    """How one array of a model / optimizer state is laid out on a mesh.

    Attributes:
      path: dotted state path, e.g. ``scanned.0.mlp.wi_gate``.
      shape: global shape.
      dtype: element type.
      logical: logical axis name per dim (None where the dim has none).
      spec: PartitionSpec under the rules used.
      shard_shape: the block one device holds.
      devices: int [n_0, ..., n_{ndim-1}, R]: mesh positions holding each block (``block_devices``).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    logical: tuple[str | None, ...]
    spec: PartitionSpec
    shard_shape: tuple[int, ...]
    devices: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def shard_nbytes(self) -> int:
        """Bytes one device holds (every device holds the same block size)."""
        return math.prod(self.shard_shape) * self.dtype.itemsize


def describe_shardings(
    tree: Any, mesh: Any = None, preset: str | Mapping[str, MeshAxes] | None = None
) -> list[ParamLayout]:
    """The layout of every array of an NNX state / object, computed from shapes and rules alone.

    Works on abstract states (``nnx.eval_shape``), so the real 309B model can be planned on a
    laptop; on a concrete sharded state the result matches the arrays' own shardings.

    Args:
      tree: an nnx State, module, optimizer, or tuple of them (concrete or abstract).
      mesh: a Mesh / AbstractMesh, {axis: size}, four sizes, or None for the current mesh.
      preset: a ``RULES`` name or custom rules; None uses the active ones (``use_mesh``).

    Returns:
      One ``ParamLayout`` per array, in state order.

    Raises:
      ValueError: if no rules are given or active.
    """
    sizes = _mesh_shape(mesh)
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    if preset is None and not current_rules():
        raise ValueError("no sharding rules: pass preset=, or call inside use_mesh(mesh, preset)")
    rules = nnx.logical_axis_rules(rules_for(preset)) if preset is not None else None
    with rules or contextlib.nullcontext():
        specs = dict(nnx.to_flat_state(param_specs(state)))
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        shape = tuple(value.shape)
        spec = specs[path].get_value() or PartitionSpec()
        logical = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
        out.append(
            ParamLayout(
                path=".".join(map(str, path)),
                shape=shape,
                dtype=np.dtype(value.dtype),
                logical=logical,
                spec=spec,
                shard_shape=shard_shape(shape, spec, sizes),
                devices=block_devices(len(shape), spec, sizes),
            )
        )
    return out


def param_bytes_per_device(
    tree: Any,
    mesh: Any = None,
    preset: str | Mapping[str, MeshAxes] | None = None,
    *,
    strict: bool = True,
) -> int:
    """Bytes of an NNX state that each device holds under a mesh shape and rule preset.

    Computed from shapes, so ``nnx.eval_shape`` of the real model (and of its optimizer, for the
    Adam moments) is enough: no devices are needed. Every device holds the same amount.

    Args:
      tree: an nnx State, module, optimizer, or tuple of them (concrete or abstract).
      mesh: a Mesh / AbstractMesh, {axis: size}, four sizes, or None for the current mesh.
      preset: a ``RULES`` name or custom rules; None uses the active ones.
      strict: refuse, as ``create_sharded`` would, a mesh that does not divide a sharded dim;
        with False such dims are counted padded (ceil).

    Returns:
      Bytes per device.

    Raises:
      ValueError: naming the parameter and mesh axes of an indivisible dim (when ``strict``).
    """
    sizes = _mesh_shape(mesh)
    if strict:
        state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
        rules = nnx.logical_axis_rules(rules_for(preset)) if preset is not None else None
        with rules or contextlib.nullcontext():
            check_divisible(state, jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
    return sum(layout.shard_nbytes for layout in describe_shardings(tree, sizes, preset))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _short_spec(layout: ParamLayout) -> str:
    """``(f+e+t, -, -)``-style spec: mesh-axis initials per dim, '-' = not split."""
    dims = _padded_spec(layout.spec, len(layout.shape))
    return "(" + ", ".join("+".join(a[0] for a in ax) or "-" for ax in dims) + ")"


def format_layouts(
    layouts: Mapping[str, Sequence[ParamLayout]], paths: Sequence[str] | None = None
) -> str:
    """A text table: one row per parameter, one column per layout (e.g. per preset).

    Each cell is the spec (mesh-axis initials per dim: d data, f fsdp, e expert, t tensor; '-'
    not split; ``f+e`` = split over fsdp x expert) and the block one device holds.

    Args:
      layouts: column title -> ``describe_shardings`` result (the same state under each).
      paths: the parameters to list (default: all of the first column's).

    Returns:
      The table as a string.
    """
    columns = {title: {lay.path: lay for lay in ls} for title, ls in layouts.items()}
    first = next(iter(columns.values()))
    paths = list(first) if paths is None else list(paths)
    missing = [p for p in paths if p not in first]
    if missing:
        raise ValueError(f"no parameters {missing}; known: {list(first)}")
    rows = [["parameter", "shape", *(f"{t}: spec, per device" for t in columns)]]
    for p in paths:
        cells = [f"{_short_spec(c[p])} {_dims(c[p].shard_shape)}" for c in columns.values()]
        rows.append([p, _dims(first[p].shape), *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
