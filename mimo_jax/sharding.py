"""Meshes, rule presets, and creating and feeding a model in its sharded layout.

Model code names *logical* axes only (``mimo_jax.axes``). A rule preset maps each logical axis
to zero or more of the four physical mesh axes:

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

This module sits above the model (it builds one); where each array lands on a mesh, computed
from shapes alone, is ``mimo_jax.layout``. Which preset and mesh suit which job:
docs/sharding.md.

Usage::

    mesh = sharding.make_mesh((1, 2, 4, 1))              # data, fsdp, expert, tensor; -1 fills
    with sharding.use_mesh(mesh, "fsdp_ep"):
        model = sharding.create_model(cfg, seed=0)       # initialised sharded, inside jit
        out = nnx.jit(lambda m, ids: m(ids))(model, ids)
"""

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from mimo_jax.axes import (
    BATCH,
    EMBED,
    EXPERT,
    EXPERT_EMBED,
    HEADS,
    KV_HEADS,
    LOGICAL_AXES,
    MESH_AXES,
    MLP,
    MOE_MLP,
    VOCAB,
    MeshAxes,
    as_tuple,
    current_rules,
    logical_to_spec,
)
from mimo_jax.config import ModelConfig
from mimo_jax.model import MiMoV2Flash

_ALL = MESH_AXES
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
        bad = [a for a in as_tuple(axes) if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; known: {MESH_AXES}")
    return tuple((name, preset.get(name)) for name in LOGICAL_AXES)


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
            n = math.prod(mesh.shape[a] for a in as_tuple(axes))
            if size % n:
                name = logical[dim] if dim < len(logical) else "?"
                raise ValueError(
                    f"parameter {'.'.join(map(str, path))} dim {dim} ({name!r}, size {size}) is "
                    f"not divisible by mesh axes {as_tuple(axes)} (size {n}); choose a mesh whose "
                    f"{as_tuple(axes)} axes divide {size}, or another preset"
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


def create_model(cfg: ModelConfig, seed: int = 0) -> MiMoV2Flash:
    """``MiMoV2Flash(cfg)`` initialised sharded under the active mesh and rules.

    Args:
      cfg: the model config.
      seed: parameter initialisation seed.

    Returns:
      The model, every parameter already in its sharded layout.
    """
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
