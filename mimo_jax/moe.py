"""Sigmoid-routed mixture of experts with aux-loss-free balancing (MiMo-V2-Flash technical
report, section 2.1).

Router: fp32 logits and sigmoid; the correction bias shifts *selection* only (DeepSeek-V3
"noaux_tc"); group-limited top-k; gate weights come from the unbiased scores, optionally
renormalised, times ``routed_scaling_factor``. No shared expert.

Expert computation has interchangeable implementations over the same parameters:
  * ``dense``: every expert on every token, one-hot combine. The reference; O(T * E).
  * ``ragged``: sort the (token, expert) pairs by expert and run grouped matmuls; dropless,
    O(T * k). On GPU/TPU the grouped matmul is ``jax.lax.ragged_dot`` (a grouped GEMM there). On
    CPU, where XLA lowers ``ragged_dot`` to a dot against every expert plus a mask (E / k times
    the work), it is blocked instead (the MegaBlocks layout, Gale et al. 2022): each expert's
    assignments are padded to a multiple of b rows, so every block of b rows belongs to one
    expert, and one batched matmul multiplies each block by its expert's gathered weights; at
    most T * k + E * b rows for any routing. ``grouped_matmul`` exposes both. For the few
    tokens of a decoding or verify step the CPU path skips the sort and the blocks
    (``cpu_expert_path``): it slices each assignment's expert weights, or runs every expert on
    the tokens with the weights read in place.
  * ``expert_parallel``: experts sharded over the mesh, tokens exchanged with all-to-all
    (``expert_parallel.py``); dropless unless ``moe_capacity_factor`` > 0.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import axes as ax
from mimo_jax.config import ModelConfig
from mimo_jax.expert_parallel import expert_parallel_moe


class ExpertBias(nnx.Variable):
    """The router's correction bias: state moved by the balancing rule, not by gradients."""


class Router(nnx.Module):
    """Sigmoid router with correction bias and group-limited top-k."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        # fp32 regardless of param_dtype, as the report keeps it (section 3): bf16 logits round
        # close scores together and so mis-rank experts.
        self.kernel = nnx.Param(
            init(rngs.params(), (cfg.embed_dim, cfg.num_experts), jnp.float32),
            out_sharding=(ax.EMBED, None),
            eager_sharding=False,
        )
        self.bias = ExpertBias(
            jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=(None,), eager_sharding=False
        )
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, routing: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Routes tokens (``route`` without the router's own choice).

        Args:
          x: [T, D] tokens (any leading shape flattened by the caller).
          routing: optional int [T, k] expert ids to replay (see ``route``).

        Returns:
          weights [T, k] fp32, expert ids int32 [T, k], scores [T, E] fp32 (unbiased sigmoid).
        """
        return self.route(x, routing)[:3]

    def route(
        self, x: jax.Array, routing: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Routes tokens, replaying recorded expert ids where given.

        Replay (Rollout Routing Replay): token t uses ``routing[t]`` instead of the router's
        choice, and its gate weights still come from this router's scores at those ids, so the
        router keeps its gradient. A token with any id < 0 (-1: not recorded, e.g. padding of a
        rollout) uses the router's own top-k for all k slots; negative ids never index experts.

        Args:
          x: [T, D] tokens (any leading shape flattened by the caller).
          routing: optional int [T, k] expert ids to replay.

        Returns:
          weights [T, k] fp32, expert ids used int32 [T, k], scores [T, E] fp32 (unbiased
          sigmoid), and the router's own choice int32 [T, k] (bias and group limit applied; the
          ids used when nothing is replayed).
        """
        cfg = self.cfg
        logits = jnp.dot(
            x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST
        )  # [T, E]
        scores = jax.nn.sigmoid(logits)
        choice = scores + jax.lax.stop_gradient(self.bias[...])  # [T, E]
        choice = jax.lax.stop_gradient(_group_limit(choice, cfg))
        own = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1].astype(jnp.int32)  # [T, k]
        if routing is None:
            idx = own
        else:
            routing = routing.astype(jnp.int32)
            unrecorded = jnp.any(routing < 0, axis=-1, keepdims=True)  # [T, 1]
            idx = jnp.where(unrecorded, own, routing)
        weights = jnp.take_along_axis(scores, idx, axis=-1)  # [T, k]
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores, own


def _group_limit(choice: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Masks experts outside the ``topk_groups`` best groups (group score = sum of its top 2)."""
    if cfg.num_expert_groups == 1:
        return choice
    t, e = choice.shape
    grouped = choice.reshape(t, cfg.num_expert_groups, e // cfg.num_expert_groups)  # [T, g, E/g]
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, g]
    _, keep = jax.lax.top_k(group_scores, cfg.topk_groups)  # [T, topk_groups]
    group_mask = jnp.zeros_like(group_scores, dtype=bool).at[jnp.arange(t)[:, None], keep].set(True)
    mask = jnp.repeat(group_mask, e // cfg.num_expert_groups, axis=-1)  # [T, E]
    return jnp.where(mask, choice, -jnp.inf)


class MoE(nnx.Module):
    """Routed experts (SwiGLU, hidden ``moe_mlp_dim``) with a switchable implementation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, m = cfg.num_experts, cfg.embed_dim, cfg.moe_mlp_dim
        init = jax.nn.initializers.normal(cfg.initializer_range)
        pd = jnp.dtype(cfg.param_dtype)
        self.router = Router(cfg, rngs=rngs)
        self.wi_gate = nnx.Param(
            init(rngs.params(), (e, d, m), pd),
            out_sharding=(ax.EXPERT, ax.EXPERT_EMBED, ax.MOE_MLP),
            eager_sharding=False,
        )
        self.wi_up = nnx.Param(
            init(rngs.params(), (e, d, m), pd),
            out_sharding=(ax.EXPERT, ax.EXPERT_EMBED, ax.MOE_MLP),
            eager_sharding=False,
        )
        self.wo = nnx.Param(
            init(rngs.params(), (e, m, d), pd),
            out_sharding=(ax.EXPERT, ax.MOE_MLP, ax.EXPERT_EMBED),
            eager_sharding=False,
        )
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, routing: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the routed experts.

        Args:
          x: [B, T, D].
          routing: optional int [B, T, k] expert ids to replay; a token with an id < 0 uses
            the router's own choice (``Router.route``).

        Returns:
          y [B, T, D] and aux: ``expert_load`` [E] (assignments per expert), ``routing``
          int32 [B, T, k] (the ids used), ``router_choice`` int32 [B, T, k] (the router's own
          top-k, equal to ``routing`` unless replaying), ``seq_aux_loss`` [] (DeepSeek-V3
          sequence-wise balance loss, unweighted), ``dropped_fraction`` [] (assignments dropped
          by an expert_parallel capacity, else 0).
        """
        cfg = self.cfg
        b, t, d = x.shape
        k = cfg.num_experts_per_tok
        flat = x.reshape(b * t, d)  # [BT, D]
        replay = None if routing is None else routing.reshape(b * t, k)
        # [BT, k] gate weights, ids used; [BT, E] scores; [BT, k] the router's own ids
        weights, idx, scores, own = self.router.route(flat, replay)
        dtype = jnp.dtype(cfg.dtype)
        dropped = jnp.zeros((), jnp.float32)
        if cfg.moe_impl == "dense":
            y = self._dense(flat.astype(dtype), weights, idx)
        elif cfg.moe_impl == "ragged":
            y = self._ragged(flat.astype(dtype), weights, idx)
        else:
            y, dropped = expert_parallel_moe(
                flat.astype(dtype),
                weights,
                idx,
                *self._weights(dtype),
                grouped_matmul=grouped_matmul,
                capacity_factor=cfg.moe_capacity_factor,
                token_chunk=cfg.moe_token_chunk,
            )
        aux = {
            "dropped_fraction": dropped,
            "expert_load": jnp.zeros((cfg.num_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0),
            "router_choice": own.reshape(b, t, k),
            "routing": idx.reshape(b, t, k),
            "seq_aux_loss": _sequence_aux_loss(scores.reshape(b, t, -1), idx.reshape(b, t, k), cfg),
        }
        return y.reshape(b, t, d).astype(x.dtype), aux

    def _weights(self, dtype):
        return (
            self.wi_gate[...].astype(dtype),
            self.wi_up[...].astype(dtype),
            self.wo[...].astype(dtype),
        )

    def _dense(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """Reference: every expert on every token, combined with one-hot gate weights."""
        wg, wu, wo = self._weights(x.dtype)
        gate = jnp.einsum("td,edm->tem", x, wg)  # [T, E, M]
        up = jnp.einsum("td,edm->tem", x, wu)
        out = jnp.einsum("tem,emd->ted", jax.nn.silu(gate) * up, wo)  # [T, E, D]
        combine = jnp.sum(
            jax.nn.one_hot(idx, self.cfg.num_experts, dtype=jnp.float32) * weights[..., None],
            axis=1,
        )  # [T, E]
        return jnp.einsum("ted,te->td", out.astype(jnp.float32), combine)

    def _ragged(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """Dropless grouped matmul: sort assignments by expert, grouped matmuls, scatter back.

        Args:
          x: [T, D] tokens.
          weights: [T, k] fp32 gate weights.
          idx: int [T, k] expert ids.

        Returns:
          [T, D] fp32.
        """
        wg, wu, wo = self._weights(x.dtype)
        t, k = idx.shape
        if grouped_matmul_impl() == "blocked":
            path = cpu_expert_path(t, k, self.cfg.num_experts)
            if path == "sliced":
                return _sliced_experts(x, weights, idx, wg, wu, wo)
            if path == "dense":
                return _dense_experts(x, weights, idx, wg, wu, wo)
        flat_idx = idx.reshape(-1)  # [T*k]
        order = jnp.argsort(flat_idx, stable=True)  # [T*k] assignments sorted by expert
        group_sizes = jnp.bincount(flat_idx, length=self.cfg.num_experts).astype(jnp.int32)  # [E]
        if grouped_matmul_impl() == "blocked":
            return _blocked_experts(x, weights, order, group_sizes, wg, wu, wo)
        token = order // k  # source token of each sorted assignment
        xs = jnp.take(x, token, axis=0)  # [T*k, D]
        gate = grouped_matmul(xs, wg, group_sizes, implementation="ragged_dot")  # [T*k, M]
        up = grouped_matmul(xs, wu, group_sizes, implementation="ragged_dot")
        h = jax.nn.silu(gate) * up
        out = grouped_matmul(h, wo, group_sizes, implementation="ragged_dot")  # [T*k, D]
        w = jnp.take(weights.reshape(-1), order)[:, None]  # [T*k, 1]
        return jax.ops.segment_sum(out.astype(jnp.float32) * w, token, num_segments=t)  # [T, D]


def _sequence_aux_loss(scores: jax.Array, idx: jax.Array, cfg: ModelConfig) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_e f_e * P_e, averaged over sequences.

    f_e = E / (k T) * (# tokens of the sequence routed to e); P_e = mean over the sequence of the
    normalised scores s / sum(s).

    Args:
      scores: [B, T, E] unbiased sigmoid scores.
      idx: int [B, T, k] selected experts.
      cfg: model config.

    Returns:
      [] scalar.
    """
    _, t, e = scores.shape
    k = idx.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    f = counts * (e / (k * t))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))


# ---------------------------------------------------------------------------------------------
# Grouped matmul: rows sorted by expert times that expert's weights.

GroupedMatmulImpl = Literal["auto", "blocked", "ragged_dot"]


def grouped_matmul_impl(implementation: GroupedMatmulImpl = "auto") -> str:
    """Resolves ``"auto"``: ``"blocked"`` on the CPU backend, ``"ragged_dot"`` elsewhere.

    XLA:CPU lowers ``jax.lax.ragged_dot`` to a dot against every expert followed by a mask (E / k
    times the useful FLOPs); GPU and TPU lower it to a grouped GEMM, which beats padding to blocks.
    """
    if implementation == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    if implementation not in ("blocked", "ragged_dot"):
        raise ValueError(
            f"implementation must be 'auto', 'blocked' or 'ragged_dot', got {implementation!r}"
        )
    return implementation


def default_block_size(rows: int, num_groups: int) -> int:
    """The block size b of the blocked grouped matmul for R rows over E experts.

    Padding costs up to b - 1 rows per expert, E * b / 2 in all on average; a power of two near
    R / (2E) keeps that near R / 4. Smaller blocks pad less but cost more per row: each block
    carries a gathered [D, M] weight copy and a matmul too small to use the CPU well. Clamped to
    [8, 128]: 8 is a few SIMD rows; past 128 rows a block's matmul is already efficient.

    Args:
      rows: R.
      num_groups: E.

    Returns:
      b, a power of two.
    """
    target = max(rows // (2 * num_groups), 1)
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


def _block_layout(
    group_sizes: jax.Array, rows: int, block: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Places expert-sorted rows into blocks of ``block`` rows, each block owned by one expert.

    Expert e's rows are padded up to a multiple of b, so it owns ceil(g_e / b) consecutive
    blocks. nb = ceil(R / b) + E - 1 blocks always suffice: sum_e ceil(g_e / b) is an integer
    below sum_e (g_e / b + 1) <= R / b + E. Blocks past the last group hold no rows.

    Args:
      group_sizes: int [E] rows per expert; sum <= R.
      rows: R, the static row count.
      block: b.

    Returns:
      block_expert int32 [nb] (the expert owning each block; E - 1 for the empty tail blocks),
      slot_row int32 [nb * b] (the sorted row held by each padded slot; R when empty),
      row_slot int32 [R] (the padded slot of each row; nb * b for rows past sum(group_sizes)).
    """
    e = group_sizes.shape[0]
    nb = -(-rows // block) + e - 1
    group_sizes = group_sizes.astype(jnp.int32)
    row_end = jnp.cumsum(group_sizes)  # [E] one past each group's last row
    row_start = row_end - group_sizes
    block_end = jnp.cumsum((group_sizes + block - 1) // block)  # [E]
    block_start = block_end - (group_sizes + block - 1) // block  # [E] first block of each group
    owner = jnp.searchsorted(block_end, jnp.arange(nb), side="right")  # [nb]; E past the end
    block_expert = jnp.minimum(owner, e - 1).astype(jnp.int32)
    offset = (
        jnp.arange(nb * block).reshape(nb, block) - (block_start[block_expert] * block)[:, None]
    )
    valid = (owner < e)[:, None] & (offset < group_sizes[block_expert][:, None])  # [nb, b]
    slot_row = jnp.where(valid, row_start[block_expert][:, None] + offset, rows).reshape(-1)
    r = jnp.arange(rows)
    row_expert = jnp.searchsorted(row_end, r, side="right")  # [R]; E past sum(group_sizes)
    re = jnp.minimum(row_expert, e - 1)
    row_slot = jnp.where(row_expert < e, block_start[re] * block + r - row_start[re], nb * block)
    return block_expert, slot_row.astype(jnp.int32), row_slot.astype(jnp.int32)


def _block_matmul(xb: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
    """[nb, b, D] blocks times their experts' [D, M] weights -> [nb, b, M] (one batched dot).

    Gathering the weights per block ([nb, D, M]) costs nb * D * M copies, about R * M: small next
    to the matmul's R * D * M multiply-adds; its gradient is a scatter-add back onto [E, D, M].
    """
    # block_expert is always a valid expert, so "clip" (a plain gather) instead of the default
    # "fill", whose out-of-range select costs as much as the gather itself on CPU.
    return jnp.einsum("jbd,jdm->jbm", xb, jnp.take(w, block_expert, axis=0, mode="clip"))


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: GroupedMatmulImpl = "auto",
    block_size: int | None = None,
) -> jax.Array:
    """Multiplies each group of expert-sorted rows by its expert's weights (dropless).

    Rows [sum(g[:e]), sum(g[:e + 1])) use ``w[e]``; rows past sum(group_sizes) come out as zeros
    (as with ``jax.lax.ragged_dot``). Differentiable in ``x`` and ``w``.

    Args:
      x: [R, D] rows sorted by expert.
      w: [E, D, M] expert weights.
      group_sizes: int [E] rows per expert, sum <= R.
      implementation: "blocked" (pad each group to blocks of ``block_size`` rows, one batched
        matmul; cheap on CPU), "ragged_dot" (``jax.lax.ragged_dot``; a grouped GEMM on GPU/TPU,
        every expert masked on CPU) or "auto" (blocked on CPU, ragged_dot elsewhere).
      block_size: b for "blocked"; default ``default_block_size(R, E)``.

    Returns:
      [R, M] in the result dtype of ``x @ w``.
    """
    if grouped_matmul_impl(implementation) == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    r, d = x.shape
    b = block_size or default_block_size(r, w.shape[0])
    block_expert, slot_row, row_slot = _block_layout(group_sizes, r, b)
    nb = block_expert.shape[0]
    xb = jnp.take(x, slot_row, axis=0, mode="fill", fill_value=0).reshape(nb, b, d)  # [nb, b, D]
    yb = _block_matmul(xb, w, block_expert).reshape(nb * b, -1)  # [nb * b, M]
    return jnp.take(yb, row_slot, axis=0, mode="fill", fill_value=0)  # [R, M]


# Most (token, expert) assignments ``_sliced_experts`` takes: it unrolls one weight slice per
# assignment, so this bounds the program it adds (a decoding step of a few rows needs a few).
SLICED_MAX_ROWS = 32
# The blocked layout's smallest block (``default_block_size``): it runs at least E blocks of this
# many rows, so every expert on up to this many tokens computes no more rows than it does.
_MIN_BLOCK = 8


def cpu_expert_path(tokens: int, k: int, num_experts: int) -> str:
    """Which expert computation the CPU ``ragged`` MoE runs for ``tokens`` tokens (static).

    * ``"sliced"`` while 2 * T * k <= E (and T * k <= ``SLICED_MAX_ROWS``): one weight slice per
      assignment, copying at most half of the experts' weights (``_sliced_experts``);
    * ``"dense"`` while T <= 8: every expert on every token with the weights read in place and a
      one-hot combine (``_dense_experts``), no more rows than the blocked layout's E blocks of
      at least 8 rows and no weight copies;
    * ``"blocked"`` otherwise (prefill, training): the blocked grouped matmul.

    Args:
      tokens: T, tokens in the call (batch x sequence).
      k: experts per token.
      num_experts: E.

    Returns:
      "sliced", "dense" or "blocked".
    """
    if 2 * tokens * k <= num_experts and tokens * k <= SLICED_MAX_ROWS:
        return "sliced"
    return "dense" if tokens <= _MIN_BLOCK else "blocked"


def _dense_experts(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    wg: jax.Array,
    wu: jax.Array,
    wo: jax.Array,
) -> jax.Array:
    """Every expert on every token, batched over experts, combined with one-hot gate weights.

    The math of ``MoE._dense``, laid out for a few tokens: the matmuls batch over the experts'
    leading axis, so each reads its [D, M] weights where they lie. (``MoE._dense``'s
    "td,edm->tem" makes XLA:CPU transpose every expert's weights first once T > 1.)

    Args:
      x: [T, D] tokens.
      weights: [T, k] gate weights.
      idx: int [T, k] expert ids.
      wg, wu: [E, D, M] gate / up weights; wo: [E, M, D].

    Returns:
      [T, D] fp32.
    """
    e, (t, d) = wg.shape[0], x.shape
    dims = (((2,), (1,)), ((0,), (0,)))  # batch over experts, contract D (then M)
    xb = jnp.broadcast_to(x, (e, t, d))  # [E, T, D]
    gate = jax.lax.dot_general(xb, wg, dims)  # [E, T, M]
    up = jax.lax.dot_general(xb, wu, dims)
    out = jax.lax.dot_general(jax.nn.silu(gate) * up, wo, dims)  # [E, T, D]
    combine = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("etd,te->td", out.astype(jnp.float32), combine)  # [T, D]


def _sliced_experts(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    wg: jax.Array,
    wu: jax.Array,
    wo: jax.Array,
) -> jax.Array:
    """The SwiGLU expert FFN for a few assignments: each one's expert weights sliced out.

    A CPU path of ``MoE._ragged`` (``cpu_expert_path``). Each assignment copies its expert's
    [D, M] slices with ``dynamic_slice`` (a contiguous copy, unlike a general gather) and the
    matmuls batch over assignments, one row each. That copies at most E / 2 weight sets (the
    blocked layout gathers at least E) and skips the sort, block layout and padding rows, which
    at a few rows cost more than the matmuls. Exact up to the order
    of fp32 additions; differentiable (each slice's gradient adds into its expert).

    Args:
      x: [T, D] tokens.
      weights: [T, k] gate weights.
      idx: int [T, k] expert ids.
      wg, wu: [E, D, M] gate / up weights; wo: [E, M, D].

    Returns:
      [T, D] fp32.
    """
    (t, d), k = x.shape, idx.shape[1]
    flat = idx.reshape(-1)  # [T*k] assignment a = token a // k

    def slices(w):  # [T*k, D, M] (or [T*k, M, D]): assignment a's expert's weights
        return jnp.stack(
            [jax.lax.dynamic_index_in_dim(w, flat[a], keepdims=False) for a in range(t * k)]
        )

    dims = (((2,), (1,)), ((0,), (0,)))  # batch over assignments, contract D (then M)
    xs = jnp.repeat(x, k, axis=0)[:, None]  # [T*k, 1, D]
    gate = jax.lax.dot_general(xs, slices(wg), dims)  # [T*k, 1, M]
    up = jax.lax.dot_general(xs, slices(wu), dims)
    out = jax.lax.dot_general(jax.nn.silu(gate) * up, slices(wo), dims)[:, 0]  # [T*k, D]
    w = weights.reshape(-1, 1).astype(jnp.float32)  # [T*k, 1]
    return jnp.sum((out.astype(jnp.float32) * w).reshape(t, k, d), axis=1)  # [T, D]


def _blocked_experts(
    x: jax.Array,
    weights: jax.Array,
    order: jax.Array,
    group_sizes: jax.Array,
    wg: jax.Array,
    wu: jax.Array,
    wo: jax.Array,
) -> jax.Array:
    """The whole SwiGLU expert FFN in the blocked layout (CPU path of ``MoE._ragged``).

    Three ``grouped_matmul`` calls would pad and unpad around each matmul; here tokens are
    gathered straight into the padded blocks once, gate/up/down all run on blocks, and the
    combine sums the blocks back onto tokens: one gather in and one sum out, not a gather each
    way around each of the three matmuls.

    Args:
      x: [T, D] tokens.
      weights: [T, k] gate weights.
      order: int [T*k] flat assignment indices sorted by expert.
      group_sizes: int [E] assignments per expert.
      wg, wu: [E, D, M] gate / up weights; wo: [E, M, D].

    Returns:
      [T, D] fp32.
    """
    (t, d), k = x.shape, weights.shape[1]
    r = t * k
    b = default_block_size(r, wg.shape[0])
    block_expert, slot_row, _ = _block_layout(group_sizes, r, b)
    nb = block_expert.shape[0]
    valid = slot_row < r  # [nb * b] padding slots are False
    assign = jnp.take(order, slot_row, mode="fill", fill_value=0)  # [nb * b] flat assignment
    token = jnp.where(valid, assign // k, t)  # t: out of range, dropped by the combine
    # Padding slots read the last token ("clip" is a plain gather, "fill" adds a select): their
    # outputs get weight 0 and an out-of-range segment, so they reach neither y nor any gradient.
    xb = jnp.take(x, token, axis=0, mode="clip").reshape(nb, b, d)  # [nb, b, D]
    gate = _block_matmul(xb, wg, block_expert)  # [nb, b, M]
    up = _block_matmul(xb, wu, block_expert)
    out = _block_matmul(jax.nn.silu(gate) * up, wo, block_expert).reshape(nb * b, d)
    w = jnp.where(valid, jnp.take(weights.reshape(-1), assign), 0.0)[:, None]  # [nb * b, 1]
    return jax.ops.segment_sum(out.astype(jnp.float32) * w, token, num_segments=t)  # [T, D]
