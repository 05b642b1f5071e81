"""Expert-parallel MoE: experts sharded over mesh axes, tokens exchanged with all-to-all.

Inside ``jax.shard_map`` each device holds its own tokens (the batch is sharded) and ``E / X``
experts (X = product of the mesh axes the active rules give the ``exp`` logical axis):

  1. dispatch: every (token, expert) assignment is written into a send buffer [X, C, D], row x
     holding the assignments bound for the device that owns expert e (x = e // (E / X)), in
     token order;
  2. ``all_to_all`` over the expert axes: device x receives [X, C, D], row j being what device j
     sent it, plus the local expert id of every slot (-1 = empty);
  3. the local experts run as one grouped matmul over the received rows (sorted by expert);
  4. ``all_to_all`` back, and each assignment's output is weighted and summed into its token.

Buffer size C: dropless by default, C = n * k (n local tokens, k experts per token): the worst
case, in which every assignment of the device goes to one peer, still fits, so nothing is ever
dropped. That costs X * n * k * D elements per device per buffer (X times the average need). With
``capacity_factor = c > 0``, C = ceil(c * n * k / X): assignments past C for a peer are dropped
(their contribution is zero, the residual path carries the token) and the dropped fraction is
returned so training can report it.

Token chunks: with ``token_chunk = c > 0`` each device dispatches its tokens c at a time (a
``lax.map`` whose body is rematerialised in the backward pass), so every buffer above holds
X * c * k rows instead of X * n * k. The result is identical when dropless; with a capacity
factor, capacity applies per chunk. The all-to-all volume is unchanged; only peak memory falls.

Only fixed-size ``jax.lax.all_to_all`` is used, so the same code runs on CPU devices (where
``jax.lax.ragged_all_to_all`` has no implementation), GPU and TPU; the tests compare it with the
``dense`` and ``ragged`` implementations on 8 CPU devices, forward and gradients.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimo_jax import axes as ax

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def capacity(n: int, k: int, num_shards: int, capacity_factor: float) -> int:
    """Slots per (source, destination) device pair: n * k when dropless (factor 0)."""
    if capacity_factor <= 0:
        return n * k
    return max(1, math.ceil(capacity_factor * n * k / num_shards))


def expert_parallel_moe(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
    *,
    grouped_matmul: GroupedMatmul,
    capacity_factor: float = 0.0,
    token_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Routed SwiGLU experts with experts sharded over the active mesh (call under ``use_mesh``).

    Args:
      x: [N, D] tokens (compute dtype).
      weights: [N, k] fp32 gate weights.
      idx: int32 [N, k] expert ids.
      wi_gate: [E, D, M].
      wi_up: [E, D, M].
      wo: [E, M, D].
      grouped_matmul: ``(rows [R, D], w [E_local, D, M], group_sizes [E_local]) -> [R, M]``
        with rows sorted by expert (``mimo_jax.moe.grouped_matmul``).
      capacity_factor: 0 for dropless, else the slots per peer relative to an even split.
      token_chunk: tokens per device dispatched at a time (0 = all; see the module docstring).

    Returns:
      y [N, D] fp32 and the fraction of assignments dropped [] (0 when dropless).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            "moe_impl='expert_parallel' needs a device mesh: run the model inside "
            "mimo_jax.sharding.use_mesh(mesh, preset)"
        )
    n, d = x.shape
    e = wi_gate.shape[0]
    tok_axes = ax.mesh_axes(ax.BATCH)
    ex_axes = ax.mesh_axes(ax.EXPERT)
    shards = math.prod(mesh.shape[a] for a in ex_axes)
    if e % shards:
        raise ValueError(
            f"num_experts={e} is not divisible by the expert mesh axes {ex_axes} (size {shards})"
        )
    # Pad the tokens to whole chunks on every token shard; padded rows get weight 0.
    tok_shards = math.prod(mesh.shape[a] for a in tok_axes)
    local = -(-n // tok_shards)
    chunk = min(token_chunk, local) if token_chunk > 0 else local
    chunks = -(-local // chunk)
    pad = chunks * chunk * tok_shards - n
    valid = jnp.arange(n + pad) < n  # [N + pad]
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)))
    cap = capacity(chunk, idx.shape[1], shards, capacity_factor)

    def per_device(x, weights, idx, valid, wg, wu, wo):
        def one_chunk(args):
            return _dispatch_compute_combine(
                *args, wg, wu, wo, ex_axes, shards, cap, grouped_matmul
            )

        if chunks == 1:
            y, dropped = one_chunk((x, weights, idx, valid))
            return y, dropped[None]
        split = (x, weights, idx, valid)
        split = jax.tree.map(lambda a: a.reshape(chunks, chunk, *a.shape[1:]), split)
        y, dropped = jax.lax.map(jax.checkpoint(one_chunk), split)  # [chunks, chunk, D]
        return y.reshape(chunks * chunk, d), jnp.sum(dropped)[None]

    tok = P(tok_axes or None)
    w_spec = P(ex_axes or None)
    y, dropped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(tok, tok, tok, tok, w_spec, w_spec, w_spec),
        out_specs=(tok, tok),
        check_vma=False,
    )(x, weights, idx, valid, wi_gate, wi_up, wo)
    return y[:n], jnp.sum(dropped) / (n * idx.shape[1])


def _dispatch_compute_combine(
    x, weights, idx, valid, wg, wu, wo, ex_axes, shards, cap, grouped_matmul
):
    """One device's part: x [n, D], weights/idx [n, k], valid [n], local experts [E_l, ...]."""
    n, k = idx.shape
    d = x.shape[1]
    e_local = wg.shape[0]
    flat = idx.reshape(-1)  # [A], A = n * k, in token order
    dest = flat // e_local  # [A] device owning the expert
    # Slot of each assignment inside its destination's buffer: its rank among assignments with
    # the same destination, in token order (so with a capacity, later tokens are dropped first).
    token = jnp.arange(n * k) // k  # [A]
    live = valid[token]  # [A] padding rows send nothing
    onehot = jax.nn.one_hot(dest, shards, dtype=jnp.int32) * live[:, None]  # [A, X]
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # [A]
    kept = live & (rank < cap)  # [A]
    slot = jnp.where(kept, dest * cap + rank, shards * cap)  # [A]; out of range = not sent
    send_x = jnp.zeros((shards * cap, d), x.dtype).at[slot].set(x[token], mode="drop")
    send_e = jnp.full((shards * cap,), -1, jnp.int32).at[slot].set(flat % e_local, mode="drop")

    recv_x, recv_e = _exchange(send_x, ex_axes, shards), _exchange(send_e, ex_axes, shards)
    out = _local_experts(recv_x, recv_e, wg, wu, wo, grouped_matmul)  # [X * C, D]
    back = _exchange(out, ex_axes, shards)  # [X * C, D], in this device's send layout

    per_assign = jnp.take(back, jnp.minimum(slot, shards * cap - 1), axis=0)  # [A, D]
    w = jnp.where(kept, weights.reshape(-1), 0.0)[:, None]  # [A, 1]
    y = jax.ops.segment_sum(per_assign.astype(jnp.float32) * w, token, num_segments=n)  # [n, D]
    return y, jnp.sum(live & ~kept).astype(jnp.float32)


def _exchange(buf: jax.Array, axes: tuple[str, ...], shards: int) -> jax.Array:
    """all_to_all of [X * C, ...]: chunk x goes to device x, chunk j comes back from device j."""
    if shards == 1:
        return buf
    return jax.lax.all_to_all(buf, axes, split_axis=0, concat_axis=0, tiled=True)


def _local_experts(rows, expert, wg, wu, wo, grouped_matmul):
    """SwiGLU of the local experts on received rows [R, D] (expert -1 = empty slot) -> [R, D]."""
    e_local = wg.shape[0]
    key = jnp.where(expert < 0, e_local, expert)  # empty slots sort last
    order = jnp.argsort(key, stable=True)  # [R]
    xs = jnp.take(rows, order, axis=0)  # [R, D]
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)  # [E_l]
    gate = grouped_matmul(xs, wg, group_sizes)  # [R, M]
    up = grouped_matmul(xs, wu, group_sizes)
    out = grouped_matmul(jax.nn.silu(gate) * up, wo, group_sizes)  # [R, D]
    valid = (jnp.arange(rows.shape[0]) < jnp.sum(group_sizes))[:, None]
    out = jnp.where(valid, out, 0)
    return jnp.zeros_like(out).at[order].set(out)  # back to receive order
