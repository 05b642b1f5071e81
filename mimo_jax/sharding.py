"""Device meshes, logical axis names and the rule presets that map them onto a mesh.

Model code names *logical* axes only (the constants below, attached to every parameter as
``out_sharding`` metadata and to activations through ``constrain``). A rule preset maps each
logical axis to zero or more of the four physical mesh axes:

  data    pure data parallelism: batch only, parameters replicated.
  fsdp    ZeRO-3: batch, and parameters sharded along their ``embed`` dim (gathered per use).
  expert  expert parallelism: the expert dim of the MoE weights; tokens too (EP ranks hold
          different tokens and exchange them with all-to-all, see ``expert_parallel.py``).
  tensor  Megatron tensor parallelism: attention heads, FFN hidden, vocab.

Presets (``RULES``), each valid on any mesh shape (an axis a preset does not otherwise use only
carries batch or acts as extra FSDP, so meshes can be resized without changing presets):

  fsdp      every weight sharded on ``embed`` over fsdp x expert x tensor; batch over all axes.
  fsdp_ep   experts on ``expert``, their ``embed`` dim on fsdp x tensor; everything else FSDP
            over fsdp x expert x tensor; batch over all axes.
  tp_ep     heads, kv heads, dense FFN, expert FFN and vocab on ``tensor``, experts on
            ``expert``, ``embed`` on fsdp; batch over data x fsdp x expert.
  decode    no FSDP (weights must not be gathered every token): heads / FFN / vocab on
            ``tensor``, experts on fsdp x expert, the rest replicated; batch over
            data x fsdp x expert.

Usage::

    mesh = sharding.make_mesh((1, 2, 4, 1))              # data, fsdp, expert, tensor; -1 fills
    with sharding.use_mesh(mesh, "fsdp_ep"):
        model = sharding.create_model(cfg, seed=0)       # initialised sharded, inside jit
        out = nnx.jit(lambda m, ids: m(ids))(model, ids)
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERT = "exp"
EXPERT_EMBED = "exp_embed"  # the embed dim of expert weights (its own name: see fsdp_ep)
MOE_MLP = "moe_mlp"
LAYERS = "layers"
NORM = "norm"
# Activation axes.
BATCH = "batch"

LOGICAL_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, EXPERT_EMBED, MOE_MLP,
                LAYERS, NORM, BATCH)  # fmt: skip

# Mesh axes.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None

_ALL = ("data", "fsdp", "expert", "tensor")
_NOT_DATA = ("fsdp", "expert", "tensor")
_TOKENS = ("data", "fsdp", "expert")

RULES: dict[str, dict[str, MeshAxes]] = {
    "fsdp": {BATCH: _ALL, EMBED: _NOT_DATA, EXPERT_EMBED: _NOT_DATA},
    "fsdp_ep": {BATCH: _ALL, EMBED: _NOT_DATA, EXPERT: "expert", EXPERT_EMBED: ("fsdp", "tensor")},
    "tp_ep": {
        BATCH: _TOKENS,
        EMBED: "fsdp",
        EXPERT_EMBED: "fsdp",
        EXPERT: "expert",
        HEADS: "tensor",
        KV_HEADS: "tensor",
        MLP: "tensor",
        MOE_MLP: "tensor",
        VOCAB: "tensor",
    },
    "decode": {
        BATCH: _TOKENS,
        EXPERT: ("fsdp", "expert"),
        HEADS: "tensor",
        KV_HEADS: "tensor",
        MLP: "tensor",
        MOE_MLP: "tensor",
        VOCAB: "tensor",
    },
}


def rules_for(preset: str | Mapping[str, MeshAxes]) -> tuple[tuple[str, MeshAxes], ...]:
    """The full (logical, mesh axes) rule list of a preset; unnamed logical axes map to None.

    Args:
      preset: a name in ``RULES`` or a custom {logical axis: mesh axes} mapping.

    Returns:
      Rules in the form ``flax``'s ``logical_axis_rules`` expects, one per logical axis.
    """
    if isinstance(preset, str):
        if preset not in RULES:
            raise ValueError(f"unknown sharding preset {preset!r}; expected one of {list(RULES)}")
        preset = RULES[preset]
    unknown = sorted(set(preset) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(
            f"sharding rules name unknown logical axes {unknown}; known: {LOGICAL_AXES}"
        )
    for name, axes in preset.items():
        bad = [a for a in _as_tuple(axes) if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; known: {MESH_AXES}")
    return tuple((name, preset.get(name)) for name in LOGICAL_AXES)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(shape: Sequence[int] = (1, -1, 1, 1), devices: Sequence[Any] | None = None):
    """A ``(data, fsdp, expert, tensor)`` mesh; one entry may be -1 to take the remaining devices.

    Args:
      shape: four axis sizes.
      devices: devices to use (default: all of ``jax.devices()``); a mesh without -1 may use
        only the first ones (with a warning).

    Returns:
      A ``jax.sharding.Mesh`` with Auto axes (the compiler propagates shardings between the
      constraints we place).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, {len(devices)} available"
        )
    if math.prod(shape) < len(devices):
        logging.warning("mesh %s uses %d of %d devices", shape, math.prod(shape), len(devices))
        devices = devices[: math.prod(shape)]
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh, preset: str | Mapping[str, MeshAxes]) -> Iterator[None]:
    """Makes ``mesh`` and the preset's logical rules current (for init, jit, constraints, EP)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(preset)):
        yield


def current_rules() -> dict[str, MeshAxes]:
    """The active {logical axis: mesh axes} rules (empty outside ``use_mesh``)."""
    return dict(spmd.get_logical_axis_rules())


def mesh_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes the active rules give a logical axis, restricted to axes of size > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in _as_tuple(current_rules().get(logical)) if mesh.shape[a] > 1)


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of an array whose dims carry these logical names, under the active rules."""
    rules = current_rules()
    return PartitionSpec(*(None if a is None else rules.get(a) for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; the identity outside ``use_mesh``.

    An activation dim keeps the longest prefix of its mesh axes whose sizes divide it (a
    one-sequence decode step cannot be split over 8 batch shards; it is replicated instead).
    This is a layout hint only: values are the same either way.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return x
    spec = []
    for size, mapped in zip(x.shape, logical_to_spec(axes), strict=True):
        kept, n = [], 1
        for a in _as_tuple(mapped):
            if size % (n * mesh.shape[a]):
                break
            kept.append(a)
            n *= mesh.shape[a]
        spec.append(tuple(kept) or None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


# ---------------------------------------------------------------------------------------------
# Parameters.


def param_specs(tree: Any) -> Any:
    """PartitionSpec of every Variable in an nnx State / module tree, under the active rules.

    Raises:
      ValueError: outside ``use_mesh`` (the specs would be logical names, not mesh axes).
    """
    if not current_rules():
        raise ValueError("param_specs needs rules: call it inside sharding.use_mesh(mesh, preset)")
    return nnx.get_partition_spec(tree)


def check_divisible(state: Any, mesh) -> None:
    """Refuses a mesh that does not divide a parameter dim it shards, naming both.

    Args:
      state: nnx State (concrete or abstract) of a model or optimizer.
      mesh: the mesh.

    Raises:
      ValueError: naming the parameter, its dim (logical name and size) and the mesh axes.
    """
    specs = param_specs(state)
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, var in nnx.to_flat_state(state):
        spec = flat_specs[path].get_value()
        if spec is None:
            continue
        logical = var.get_metadata().get("out_sharding") or ()
        for dim, (size, axes) in enumerate(zip(var.get_value().shape, spec, strict=False)):
            n = math.prod(mesh.shape[a] for a in _as_tuple(axes))
            if size % n:
                name = logical[dim] if dim < len(logical) else "?"
                raise ValueError(
                    f"parameter {'.'.join(map(str, path))} dim {dim} ({name!r}, size {size}) is "
                    f"not divisible by mesh axes {_as_tuple(axes)} (size {n}); choose a mesh whose "
                    f"{_as_tuple(axes)} axes divide {size}, or another preset"
                )


def create_sharded(make: Any) -> Any:
    """Builds an NNX object (model, or model + optimizer) directly in its sharded layout.

    ``make`` runs inside ``jax.jit`` with every Variable constrained to the PartitionSpec its
    logical axes get under the active rules, so no device ever holds a whole unsharded copy.
    Call under ``use_mesh``.

    Args:
      make: zero-argument function returning the NNX object.

    Returns:
      The object with sharded arrays.

    Raises:
      ValueError: if the mesh does not divide a sharded dim (see ``check_divisible``).
    """
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        raise ValueError("create_sharded needs a mesh: call it inside sharding.use_mesh(...)")
    check_divisible(nnx.state(nnx.eval_shape(make)), mesh)

    @nnx.jit
    def init():
        obj = make()
        state = nnx.state(obj)
        nnx.update(obj, jax.lax.with_sharding_constraint(state, param_specs(state)))
        return obj

    return init()


def create_model(cfg, seed: int = 0):
    """``MiMoV2Flash(cfg)`` initialised sharded under the active mesh and rules."""
    from mimo_jax.model import MiMoV2Flash  # noqa: PLC0415  (model imports this module)

    return create_sharded(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(seed)))


def state_shardings(tree: Any) -> Any:
    """NamedShardings of an NNX state (or object) under the active mesh and rules."""
    mesh = jax.sharding.get_mesh()
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_specs(nnx.state(tree)))


def batch_sharding(ndim: int, batch_dim: int = 0) -> NamedSharding:
    """NamedSharding of a token array whose ``batch_dim`` is the batch (other dims replicated)."""
    axes = [None] * ndim
    axes[batch_dim] = BATCH
    return NamedSharding(jax.sharding.get_mesh(), logical_to_spec(axes))


def put_batch(batch: np.ndarray, batch_dim: int = 0) -> jax.Array:
    """Places a host batch (the same global array on every process) onto the mesh, sharded.

    Works multi-process: each process contributes the shards of its addressable devices.
    Outside ``use_mesh`` it is a plain device array.
    """
    if jax.sharding.get_mesh().empty:
        return jnp.asarray(batch)
    sharding = batch_sharding(batch.ndim, batch_dim)
    return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


# ---------------------------------------------------------------------------------------------
# Layouts from shapes: where each parameter lives, and what a device holds (no devices needed).


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
    return tuple(_as_tuple(e) for e in entries) + ((),) * (ndim - len(entries))


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
