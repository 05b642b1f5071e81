"""Multi-token prediction block (the MiMo-V2-Flash technical report, section 2.3; docs/model.md).

MTP layer k at position i combines the embedding of token i+k+1 with the previous hidden state
(the main model's post-norm output for k = 0, the previous MTP layer's output otherwise):

    u = eh_proj(concat(enorm(embed), hnorm(h_prev)))       # order: [embedding, hidden]
    u = u + SWA_attention(input_layernorm(u))              # sink, window, value scale as SWA layers
    u = u + DenseFFN(post_attention_layernorm(u))          # hub name: pre_mlp_layernorm
    h_k = final_layernorm(u)                               # -> shared lm_head predicts token i+k+2
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import axes as ax
from mimo_jax.attention import Attention
from mimo_jax.cache import KVCache
from mimo_jax.config import SLIDING, ModelConfig
from mimo_jax.layers import MLP, Linear, RMSNorm


class MTPLayer(nnx.Module):
    """One MTP depth: input fusion + one SWA decoder block with a dense FFN + final norm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=pd)
        kw = dict(std=cfg.initializer_range, dtype=jnp.dtype(cfg.dtype), param_dtype=pd, rngs=rngs)
        self.enorm = RMSNorm(d, **norm)
        self.hnorm = RMSNorm(d, **norm)
        self.eh_proj = Linear(2 * d, d, (ax.MLP, ax.EMBED), **kw)
        self.input_layernorm = RMSNorm(d, **norm)
        self.self_attn = Attention(cfg, SLIDING, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, **norm)
        self.mlp = MLP(d, cfg.mlp_dim, **kw)
        self.final_layernorm = RMSNorm(d, **norm)

    def fuse(self, emb: jax.Array, h_prev: jax.Array) -> jax.Array:
        """eh_proj(concat(enorm(emb), hnorm(h_prev))): [B, T, D] x2 -> [B, T, D]."""
        return self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))

    def __call__(
        self,
        emb: jax.Array,
        h_prev: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        lengths: jax.Array | None = None,
        offset: int | jax.Array = 0,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the block (cache semantics as ``Attention.__call__``).

        Args:
          emb: [B, T, D] embeddings of the tokens k+1 ahead.
          h_prev: [B, T, D] previous depth's (post-norm) hidden states.
          positions: int [B, T] positions of the embedded tokens.
          cache: optional KVCache of this block.
          lengths: int [B] (prefill only) valid entries per row.
          offset: (prefill only) position of entry 0, int or int [B] per row.
          segment_ids: optional int [B, T] packed-row segments (no cache; see ``Attention``).

        Returns:
          ([B, T, D] post-``final_layernorm`` hidden states, the updated cache or None).
        """
        u = self.fuse(emb, h_prev)
        x = self.input_layernorm(u)
        attn, cache = self.self_attn(x, positions, cache, lengths, offset, segment_ids)
        u = u + attn
        u = u + self.mlp(self.post_attention_layernorm(u))
        return self.final_layernorm(u), cache
