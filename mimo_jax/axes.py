"""Logical axis names and activation constraints: the only sharding vocabulary model code uses.

Every parameter carries one logical name per dim (``out_sharding`` metadata) and activations are
pinned with ``constrain``; neither names a physical mesh axis. A rule preset
(``mimo_jax.sharding.RULES``, made current by ``sharding.use_mesh``) maps each logical name onto
the mesh axes below; outside ``use_mesh`` there are no rules and ``constrain`` does nothing. This
module reads the current rules and mesh only, so the model can import it without depending on
how meshes and presets are built (docs/sharding.md).
"""

from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

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

# Physical mesh axes, in mesh order.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None


def as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one rule entry as a tuple (None -> (), "fsdp" -> ("fsdp",))."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def current_rules() -> dict[str, MeshAxes]:
    """The active {logical axis: mesh axes} rules (empty outside ``sharding.use_mesh``)."""
    return dict(spmd.get_logical_axis_rules())


def mesh_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes the active rules give a logical axis, restricted to axes of size > 1.

    Args:
      logical: a logical axis name (e.g. ``BATCH``).

    Returns:
      The mesh axes, major first; () outside a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in as_tuple(current_rules().get(logical)) if mesh.shape[a] > 1)


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of an array whose dims carry these logical names, under the active rules."""
    rules = current_rules()
    return PartitionSpec(*(None if a is None else rules.get(a) for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; the identity outside ``use_mesh``.

    An activation dim keeps the longest prefix of its mesh axes whose sizes divide it (a
    one-sequence decode step cannot be split over 8 batch shards; it is replicated instead).
    This is a layout hint only: values are the same either way.

    Args:
      x: any array.
      axes: one logical name (or None) per dim of ``x``.

    Returns:
      ``x``, constrained to the layout the active rules give those names.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not current_rules():
        return x
    spec = []
    for size, mapped in zip(x.shape, logical_to_spec(axes), strict=True):
        kept, n = [], 1
        for a in as_tuple(mapped):
            if size % (n * mesh.shape[a]):
                break
            kept.append(a)
            n *= mesh.shape[a]
        spec.append(tuple(kept) or None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
