"""MiMo-V2-Flash: decoder stack with scanned layer periods, final norm, untied head, MTP chain.

    h = embed(ids)                                           # no embedding scaling
    for each layer:  h = h + attn(input_layernorm(h));  h = h + ffn(post_attention_layernorm(h))
    logits = lm_head(norm(h))                                # untied, no softcap

Layers that repeat with a period (5 SWA + 1 global in the released model) are stacked along a
leading ``layers`` axis and run under ``jax.lax.scan``, so compile time does not grow with depth;
layers before and after the repeated run are unrolled. ``layer_plan`` finds the split.
"""

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import axes as ax
from mimo_jax.attention import Attention
from mimo_jax.cache import KVCache
from mimo_jax.config import DENSE, ModelConfig
from mimo_jax.layers import MLP, Embedder, Linear, RMSNorm
from mimo_jax.moe import MoE
from mimo_jax.mtp import MTPLayer


@flax.struct.dataclass
class ModelOutput:
    """What ``MiMoV2Flash.__call__`` returns.

    Attributes:
      logits: [B, T, V] fp32 next-token logits (None when called with ``logits=False``).
      mtp_logits: one [B, T, V] per MTP depth k; position i predicts token i + k + 2 (empty
        when called with ``logits=False``).
      hidden: [B, T, D] post-norm hidden states (the input of MTP depth 0).
      mtp_hidden: one [B, T, D] per MTP depth (post ``final_layernorm``).
      aux: ``expert_load`` [L, E], ``routing`` int32 [L, B, T, k] (the experts used; -1 on dense
        layers), ``router_choice`` int32 [L, B, T, k] (the router's own top-k, equal to
        ``routing`` unless replaying; -1 on dense layers), ``seq_aux_loss`` [L] (0 on dense
        layers), ``dropped_fraction`` [L] (expert_parallel with a capacity factor; else 0).
    """

    logits: jax.Array | None
    mtp_logits: tuple[jax.Array, ...]
    hidden: jax.Array
    mtp_hidden: tuple[jax.Array, ...]
    aux: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Layers [start, start + period * repeats) run scanned; the rest run unrolled."""

    start: int
    period: int
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def locate(self, layer: int) -> tuple[str, int, int | None]:
        """Where layer i lives: ("unrolled", list index, None) or ("scanned", slot, repeat)."""
        if self.start <= layer < self.stop:
            r, slot = divmod(layer - self.start, self.period)
            return "scanned", slot, r
        return "unrolled", layer if layer < self.start else layer - self.period * self.repeats, None


def layer_plan(cfg: ModelConfig) -> LayerPlan:
    """Finds the longest run of a repeated layer period (ties: shorter period, later start)."""
    sig = list(zip(cfg.layer_types, cfg.mlp_layer_types, strict=True))
    n = len(sig)
    best, best_key = LayerPlan(0, 1, 0), (0, 0, 0)
    if not cfg.scan_layers:
        return best
    for p in range(1, n // 2 + 1):
        for s in range(n - 2 * p + 1):
            r = 1
            while s + (r + 1) * p <= n and sig[s + r * p : s + (r + 1) * p] == sig[s : s + p]:
                r += 1
            key = (p * r, -p, s)
            if r >= 2 and key > best_key:
                best, best_key = LayerPlan(s, p, r), key
    return best


class DecoderLayer(nnx.Module):
    """Pre-norm block: attention (global or SWA) then a dense FFN or the MoE."""

    def __init__(self, cfg: ModelConfig, layer_type: str, mlp_type: str, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, layer_type, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.is_moe = mlp_type != DENSE
        if self.is_moe:
            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(
                cfg.embed_dim,
                cfg.mlp_dim,
                std=cfg.initializer_range,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=pd,
                rngs=rngs,
            )
        self.cfg = cfg

    def __call__(
        self,
        h: jax.Array,
        positions: jax.Array,
        routing: jax.Array | None = None,
        cache: KVCache | None = None,
        lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array], KVCache | None]:
        """One block.

        Args:
          h: [B, T, D].
          positions: int [B, T].
          routing: optional int [B, T, k] experts to replay.
          cache: optional KVCache (see ``Attention.__call__`` for prefill vs decode).
          lengths: int [B] prompt lengths (prefill only).
          segment_ids: optional int [B, T] packed-row segments (no cache; see ``Attention``).

        Returns:
          h [B, T, D], this layer's aux (see ``ModelOutput.aux``), the updated cache or None.
        """
        attn, cache = self.self_attn(
            self.input_layernorm(h), positions, cache, lengths, segment_ids=segment_ids
        )
        h = h + attn
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(x, routing)
        else:
            y = self.mlp(x)
            b, t, _ = h.shape
            aux = {
                "expert_load": jnp.zeros((self.cfg.num_experts,), jnp.float32),
                "routing": jnp.full((b, t, self.cfg.num_experts_per_tok), -1, jnp.int32),
                "router_choice": jnp.full((b, t, self.cfg.num_experts_per_tok), -1, jnp.int32),
                "seq_aux_loss": jnp.zeros((), jnp.float32),
                "dropped_fraction": jnp.zeros((), jnp.float32),
            }
        # Block boundary: the activation layout the rule preset names (batch-sharded).
        return ax.constrain(h + y, (ax.BATCH, None, None)), aux, cache


def _run_layer(graphdef, state, h, positions, routing, cache, lengths, segments, remat: bool):
    """Applies one layer given as (graphdef, state): a pure function, so it can be scanned/remat."""

    def f(state, h, positions, routing, cache, lengths, segments):
        return nnx.merge(graphdef, state)(h, positions, routing, cache, lengths, segments)

    if remat:
        f = jax.checkpoint(f)
    return f(state, h, positions, routing, cache, lengths, segments)


class MiMoV2Flash(nnx.Module):
    """The MiMo-V2-Flash causal LM with its MTP layers."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """Builds (and initialises) every parameter.

        Args:
          cfg: model config.
          rngs: parameter RNG.
        """
        self.cfg = cfg
        self.plan = plan = layer_plan(cfg)
        dt, pd = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        std = cfg.initializer_range
        self.embed_tokens = Embedder(
            cfg.vocab_size, cfg.embed_dim, std=std, dtype=dt, param_dtype=pd, rngs=rngs
        )
        kinds = list(zip(cfg.layer_types, cfg.mlp_layer_types, strict=True))
        unrolled = [i for i in range(cfg.num_layers) if not plan.start <= i < plan.stop]
        self.layers = nnx.List([DecoderLayer(cfg, *kinds[i], rngs=rngs) for i in unrolled])
        self.scanned = nnx.List(
            [
                _stacked_layer(cfg, *kinds[plan.start + j], plan.repeats, rngs)
                for j in range(plan.period if plan.repeats else 0)
            ]
        )
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = Linear(
            cfg.embed_dim, cfg.vocab_size, (ax.EMBED, ax.VOCAB), std=std, dtype=dt,
            param_dtype=pd, rngs=rngs,
        )  # fmt: skip
        self.mtp = nnx.List([MTPLayer(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])

    def layer(self, i: int) -> tuple[DecoderLayer, int | None]:
        """Decoder layer i and its index along the stacked axis (None when unrolled)."""
        where, idx, r = self.plan.locate(i)
        return (self.scanned[idx], r) if where == "scanned" else (self.layers[idx], None)

    def decoder(
        self,
        h: jax.Array,
        positions: jax.Array,
        routing: jax.Array | None = None,
        cache: dict | None = None,
        lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array], dict | None]:
        """Runs all decoder layers.

        Args:
          h: [B, T, D] embeddings.
          positions: int [B, T].
          routing: optional int [L, B, T, k] expert ids to replay (rows of dense layers ignored).
          cache: optional decoder caches from ``init_cache`` (its "layers" and "scanned" parts).
          lengths: int [B] prompt lengths when filling the cache (prefill).
          segment_ids: optional int [B, T] packed-row segments (training forwards only).

        Returns:
          pre-norm hidden [B, T, D], aux stacked over layers in layer order, updated caches.
        """
        cfg, plan = self.cfg, self.plan
        per_layer: list[Any] = [None] * cfg.num_layers
        new_unrolled = [None] * len(self.layers)

        def run_unrolled(i):
            nonlocal h
            j = plan.locate(i)[1]
            gd, st = nnx.split(self.layers[j])
            r = None if routing is None else routing[i]
            c = None if cache is None else cache["layers"][j]
            h, per_layer[i], new_unrolled[j] = _run_layer(
                gd, st, h, positions, r, c, lengths, segment_ids, cfg.remat
            )

        for i in range(plan.start):
            run_unrolled(i)
        new_scanned = []
        if plan.repeats:
            splits = [nnx.split(m) for m in self.scanned]
            gds = [g for g, _ in splits]
            if routing is None:
                xs_routing = None
            else:
                xs_routing = routing[plan.start : plan.stop].reshape(
                    plan.repeats, plan.period, *routing.shape[1:]
                )  # [R, period, B, T, k]
            xs_cache = None if cache is None else cache["scanned"]

            def body(h, xs):
                states, r, caches = xs
                auxes, new_caches = [], []
                for j in range(plan.period):
                    rj = None if r is None else r[j]
                    cj = None if caches is None else caches[j]
                    h, aux, cj = _run_layer(
                        gds[j], states[j], h, positions, rj, cj, lengths, segment_ids, cfg.remat
                    )
                    auxes.append(aux)
                    new_caches.append(cj)
                return h, (auxes, new_caches)

            xs = ([s for _, s in splits], xs_routing, xs_cache)
            h, (auxes, new_scanned) = jax.lax.scan(body, h, xs)
            for rep in range(plan.repeats):
                for j in range(plan.period):
                    per_layer[plan.start + rep * plan.period + j] = jax.tree.map(
                        lambda a, rep=rep: a[rep], auxes[j]
                    )
        for i in range(plan.stop, cfg.num_layers):
            run_unrolled(i)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        new_cache = None if cache is None else {"layers": new_unrolled, "scanned": new_scanned}
        return h, aux, new_cache

    def init_cache(self, batch: int, max_length: int, max_new_per_step: int = 1) -> dict:
        """Empty caches for every decoder layer and MTP layer.

        Args:
          batch: sequences.
          max_length: longest total length (prompt + generated); global layers keep this many.
          max_new_per_step: most tokens one step writes (1 + draft tokens); SWA and MTP rings keep
            ``sliding_window + max_new_per_step`` slots.

        Returns:
          {"layers": [KVCache per unrolled layer], "scanned": [KVCache per period slot, stacked
          over repeats], "mtp": [KVCache per MTP layer]}.
        """
        args = (batch, max_length, max_new_per_step)
        scanned = [
            jax.tree.map(
                lambda x: jnp.broadcast_to(x, (self.plan.repeats, *x.shape)),
                _sliced_attention(m, self.cfg).init_cache(*args),
            )
            for m in self.scanned
        ]
        return {
            "layers": [m.self_attn.init_cache(*args) for m in self.layers],
            "scanned": scanned,
            "mtp": [m.self_attn.init_cache(*args) for m in self.mtp],
        }

    def prefill(
        self, input_ids: jax.Array, lengths: jax.Array, cache: dict
    ) -> tuple[jax.Array, dict, jax.Array]:
        """Runs right-padded prompts through the decoder and fills its caches.

        Args:
          input_ids: int [B, T] prompts, row b valid up to ``lengths[b]``.
          lengths: int [B] prompt lengths.
          cache: caches from ``init_cache`` (the MTP caches pass through; see ``mtp_extend``).

        Returns:
          post-norm hidden states [B, T, D] (the input of MTP depth 0), the updated caches, and
          the routing int32 [L, B, T, k] (-1 on dense layers; unused outputs cost nothing in a
          jit).
        """
        b, t = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h, aux, dec = self.decoder(self.embed_tokens(input_ids), positions, None, cache, lengths)
        return self.norm(h), {**dec, "mtp": cache["mtp"]}, aux["routing"]

    def extend(
        self, input_ids: jax.Array, positions: jax.Array, cache: dict
    ) -> tuple[jax.Array, dict, jax.Array]:
        """Appends tokens to the decoder caches and runs them (a decode or verify step).

        Args:
          input_ids: int [B, T] new tokens (T = 1 + draft tokens).
          positions: int [B, T] their consecutive positions; every cached key at a position
            >= ``positions[:, 0]`` must be one these tokens overwrite (or an empty slot).
          cache: caches from ``init_cache``, filled by ``prefill`` (the MTP caches pass through).

        Returns:
          post-norm hidden states [B, T, D], the updated caches, the routing int32
          [L, B, T, k] (-1 on dense layers).
        """
        h, aux, dec = self.decoder(self.embed_tokens(input_ids), positions, None, cache)
        return self.norm(h), {**dec, "mtp": cache["mtp"]}, aux["routing"]

    def mtp_extend(
        self,
        depth: int,
        input_ids: jax.Array,
        h_prev: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        lengths: jax.Array | None = None,
        offset: int | jax.Array = 0,
    ) -> tuple[jax.Array, KVCache]:
        """Runs MTP depth ``depth`` against its cache (fills it when ``lengths`` is given).

        Args:
          depth: k, the MTP layer.
          input_ids: int [B, T] the tokens it consumes (token i + k + 1 at index i).
          h_prev: [B, T, D] depth k - 1's output (the main model's post-norm hidden for k = 0).
          positions: int [B, T] positions of the consumed tokens; negative entries neither write
            nor see keys.
          cache: this depth's KVCache (``init_cache(...)["mtp"][depth]``).
          lengths: int [B] valid entries per row (prefill only).
          offset: prefill only: the position of entry 0, int or int [B] per row.

        Returns:
          post-``final_layernorm`` hidden states [B, T, D] (``logits`` of them predict token
          i + k + 2), the updated cache.
        """
        layer = self.mtp[depth]
        return layer(self.embed_tokens(input_ids), h_prev, positions, cache, lengths, offset)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        routing: jax.Array | None = None,
        mtp: bool = True,
        logits: bool = True,
        segment_ids: jax.Array | None = None,
        mtp_detached: bool = False,
    ) -> ModelOutput:
        """Forward pass over whole sequences (training, evaluation, parity checks).

        Args:
          input_ids: int [B, T] token ids.
          positions: optional int [B, T]; defaults to arange(T) per row.
          routing: optional int [L, B, T, k] expert ids to replay instead of routing (rows of
            dense layers ignored; a token with an id < 0 in a MoE layer's row uses that layer's
            own choice there, so ``generate``'s recorded routing replays as is).
          mtp: also run the MTP chain (``out.mtp_logits``; empty when False).
          logits: project to the vocabulary; False returns only the hidden states (a chunked
            loss then applies ``self.logits`` piecewise, see ``loss.chunked_cross_entropy``).
          segment_ids: optional int [B, T] for packed rows (``sft_data.SFTBatch``: 1, 2, ... per
            example, 0 on padding; ``positions`` restarting per example): every attention, MTP
            layers included, stays within a segment, so each example's outputs are those it has
            alone. Needs ``attention_impl="xla"``.
          mtp_detached: run the MTP chain on the trunk's outputs with no gradient into the
            trunk, the embedding or the output head, so an MTP loss trains only the MTP layers
            (RL's MTP loss on the policy's own samples must not move the policy).

        Returns:
          ModelOutput (logits in fp32).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is not None and segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got {segment_ids.shape}")
        h = ax.constrain(self.embed_tokens(input_ids), (ax.BATCH, None, None))  # [B, T, D]
        h, aux, _ = self.decoder(h, positions, routing, segment_ids=segment_ids)
        hidden = self.norm(h)
        mtp_logits, mtp_hidden = [], []
        if mtp:
            h_prev, embed, head = hidden, self.embed_tokens, self.lm_head
            if mtp_detached:
                h_prev, embed, head = jax.lax.stop_gradient(hidden), _frozen(embed), _frozen(head)
            for k, layer in enumerate(self.mtp):
                # Depth k at position i consumes token i+k+1 (and that token's position). The
                # wrapped tail positions have no label and are masked out of the loss. Packed,
                # position i keeps its segment: where token i+k+1 is in the next example the
                # label is masked (sft_data.mtp_targets), and no query with a label sees it.
                ids_k = jnp.roll(input_ids, -(k + 1), axis=1)
                h_prev, _ = layer(embed(ids_k), h_prev, positions + k + 1, segment_ids=segment_ids)
                mtp_hidden.append(h_prev)
                if logits:
                    mtp_logits.append(head(h_prev).astype(jnp.float32))
        main_logits = self.logits(hidden) if logits else None  # [B, T, V]
        return ModelOutput(main_logits, tuple(mtp_logits), hidden, tuple(mtp_hidden), aux)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The untied output head: post-norm hidden [..., D] -> fp32 logits [..., V]."""
        return self.lm_head(hidden).astype(jnp.float32)


def _frozen(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` whose weights carry no gradient (shared layers used only as inputs)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def _sliced_attention(stacked: DecoderLayer, cfg: ModelConfig) -> Attention:
    """The (config-only) attention of one repeat of a stacked layer, to size its cache."""
    layer_type = "sliding_attention" if stacked.self_attn.is_sliding else "full_attention"
    return nnx.eval_shape(lambda: Attention(cfg, layer_type, rngs=nnx.Rngs(0)))


def _stacked_layer(
    cfg: ModelConfig, layer_type: str, mlp_type: str, repeats: int, rngs: nnx.Rngs
) -> DecoderLayer:
    """``repeats`` independent DecoderLayers stacked along a leading ``layers`` axis."""

    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
    def make(rngs):
        return DecoderLayer(cfg, layer_type, mlp_type, rngs=rngs)

    return make(rngs)


def cache_bytes(cfg, *, batch: int, max_length: int, max_new_per_step: int) -> dict:
    """Bytes of the decoding cache of ``cfg`` versus caching every layer globally.

    Shapes come from ``jax.eval_shape`` over an abstract model's ``init_cache``, so nothing is
    allocated even for the full-size config.

    Args:
      cfg: a ``ModelConfig``.
      batch: sequences.
      max_length: slots of the global layers' linear caches (prompt + generated tokens).
      max_new_per_step: most tokens one step writes (the ring slack,
        ``mimo_jax.generate.max_new_per_step``).

    Returns:
      Bytes *per sequence*: ``global``, ``swa``, ``mtp`` (k + v + slot positions of each kind of
      cache, summed over its layers), ``total`` (their sum), ``all_global`` (the same layers and
      kv heads, every one of them a linear cache over ``max_length``), ``kv_only`` and
      ``all_global_kv_only`` (the same two without the int32 slot positions), and ``ratio``
      (``all_global / total``).
    """
    model = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_length, max_new_per_step))
    sliding = [m.self_attn.is_sliding for m in model.layers]
    slot_sliding = [m.self_attn.is_sliding for m in model.scanned]
    groups = {"global": [], "swa": [], "mtp": list(shapes["mtp"])}
    for c, is_swa in zip(shapes["layers"], sliding, strict=True):
        groups["swa" if is_swa else "global"].append(c)
    for c, is_swa in zip(shapes["scanned"], slot_sliding, strict=True):
        groups["swa" if is_swa else "global"].append(c)  # stacked: leading repeats axis

    def nbytes(x, slot_axis: int, slots: int | None = None) -> int:
        """Bytes of x, or of x with ``slots`` entries along its slot axis."""
        shape = list(x.shape)
        if slots is not None:
            shape[slot_axis] = slots
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    out = {}
    total = kv = full = full_kv = 0
    for name, caches in groups.items():
        out[name] = 0
        for c in caches:  # k, v: [..., B, S, K, H]; pos: [..., B, S]
            b_kv = nbytes(c.k, -3) + nbytes(c.v, -3)
            f_kv = nbytes(c.k, -3, max_length) + nbytes(c.v, -3, max_length)
            out[name] += b_kv + nbytes(c.pos, -1)
            kv += b_kv
            full_kv += f_kv
            full += f_kv + nbytes(c.pos, -1, max_length)
        out[name] //= batch
        total += out[name]
    out.update(
        total=total,
        all_global=full // batch,
        kv_only=kv // batch,
        all_global_kv_only=full_kv // batch,
    )
    out["ratio"] = out["all_global"] / out["total"]
    return out
