"""ModelConfig: every architectural number of MiMo-V2-Flash, validated; presets.

The defaults are the released model. Its hybrid layer pattern (``layer_pattern``: layer 0 and
every 6th layer global, the rest sliding-window; layer 0's FFN dense, the rest MoE) is written
here once, and so are its other numbers (the ``ModelConfig`` field defaults): the HF
``config.json`` reader (``mimo_jax.hf_config``) and the configs in ``configs/`` take them from
here.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

FULL = "full_attention"
SLIDING = "sliding_attention"
DENSE = "dense"
SPARSE = "sparse"

ATTENTION_IMPLS = ("xla", "pallas")
MOE_IMPLS = ("dense", "ragged", "expert_parallel")
DTYPES = ("float32", "bfloat16", "float16")

# The released model: layer i attends globally when i == 0 or (i + 1) % GLOBAL_EVERY == 0
# (MiMo-V2-Flash technical report, section 2.1 and figure 2), and its first layer has a dense
# FFN.
GLOBAL_EVERY = 6
NUM_DENSE_LAYERS = 1


def layer_pattern(
    num_layers: int, global_every: int = GLOBAL_EVERY, num_dense_layers: int = NUM_DENSE_LAYERS
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The hybrid layer pattern: which layers attend globally and which have a dense FFN.

    Args:
      num_layers: decoder layers.
      global_every: layer i is global when i == 0 or (i + 1) % global_every == 0; others SWA.
      num_dense_layers: leading layers with a dense SwiGLU FFN; the rest are MoE.

    Returns:
      (layer_types, mlp_layer_types), one entry per layer each.
    """
    layer_types = tuple(
        FULL if (i == 0 or (i + 1) % global_every == 0) else SLIDING for i in range(num_layers)
    )
    mlp_layer_types = (DENSE,) * num_dense_layers + (SPARSE,) * (num_layers - num_dense_layers)
    return layer_types, mlp_layer_types


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a MiMo-V2-Flash model (the defaults are the released 309B model).

    ``mimo_jax.hf_config`` converts it from and to HF ``config.json``; the hub key of a field,
    where its name differs, is given in parentheses.

    Attributes:
      vocab_size: vocabulary size V (hub ``vocab_size``).
      embed_dim: residual width D (``hidden_size``).
      mlp_dim: hidden width F of the dense SwiGLU FFN (layer 0 and the MTP blocks;
        ``intermediate_size``).
      moe_mlp_dim: hidden width M of each routed expert (``moe_intermediate_size``).
      num_heads: query heads N, on both layer types (``num_attention_heads``).
      num_kv_heads: kv heads K on global-attention layers (``num_key_value_heads``).
      swa_num_kv_heads: kv heads on sliding-window layers and MTP blocks
        (``swa_num_key_value_heads``; transformers hard-codes 2 * num_kv_heads).
      head_dim: query/key head dim H; the logit scale is H ** -0.5.
      v_head_dim: value head dim P.
      layer_types: per layer, "full_attention" or "sliding_attention".
      mlp_layer_types: per layer, "dense" (SwiGLU) or "sparse" (MoE).
      sliding_window: keys visible to a query on SWA layers, counting the query itself
        (transformers' convention; the hub's ``sliding_window_size=128`` is 129 here).
      rope_theta: RoPE base on global layers.
      swa_rope_theta: RoPE base on SWA layers and MTP blocks.
      partial_rotary_factor: fraction of head_dim that is rotated (NeoX half rotation on the first
        ``int(head_dim * factor)`` dims).
      attention_value_scale: multiplier applied to v before attention.
      swa_attention_sink: whether SWA layers (and MTP blocks) have a learnable sink logit per head.
      full_attention_sink: whether global layers have one (False in the released model).
      num_experts: routed experts E (``n_routed_experts``).
      num_experts_per_tok: experts per token (top-k).
      num_expert_groups: expert groups for group-limited routing (``n_group``).
      topk_groups: groups kept per token (``topk_group``).
      norm_topk_prob: renormalise the top-k gate weights to sum to one.
      routed_scaling_factor: multiplier on the gate weights (null on the hub means 1.0).
      rms_norm_eps: RMSNorm epsilon (hub ``layernorm_epsilon``).
      num_mtp_layers: multi-token-prediction blocks D (``num_nextn_predict_layers``; 3 in the
        released checkpoint, which does not state it in config.json).
      max_position_embeddings: longest supported context.
      initializer_range: std of the normal initialiser for weights.
      bos_token_id / eos_token_id / pad_token_id: special token ids (None when unknown).
      dtype: compute dtype of activations ("float32" or "bfloat16").
      param_dtype: storage dtype of parameters (the router stays float32 regardless).
      attention_impl: "xla" or "pallas" (``pallas_kernels.attention`` implementation).
      moe_impl: "dense" (reference), "ragged" (sorted grouped matmul) or "expert_parallel"
        (experts sharded over the mesh, tokens exchanged with all-to-all; needs ``use_mesh``).
      moe_capacity_factor: expert_parallel only: 0 is dropless (worst-case buffers); c > 0 keeps
        c times an even share of slots per peer and drops the overflow (reported in aux).
      moe_token_chunk: expert_parallel only: tokens per device dispatched at a time (0 = all).
        The all-to-all buffers hold X * chunk * k rows instead of X * n * k (X expert shards, n
        tokens per device); each chunk is rematerialised in the backward pass.
      scan_layers: run repeated layer periods under ``jax.lax.scan``.
      remat: rematerialise each decoder layer in the backward pass.
    """

    vocab_size: int = 152576
    embed_dim: int = 4096
    mlp_dim: int = 16384
    moe_mlp_dim: int = 2048
    num_heads: int = 64
    num_kv_heads: int = 4
    swa_num_kv_heads: int = 8
    head_dim: int = 192
    v_head_dim: int = 128
    layer_types: tuple[str, ...] = layer_pattern(48)[0]
    mlp_layer_types: tuple[str, ...] = layer_pattern(48)[1]
    sliding_window: int = 129
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.334
    attention_value_scale: float = 0.707
    swa_attention_sink: bool = True
    full_attention_sink: bool = False
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_expert_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    num_mtp_layers: int = 3
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    attention_impl: Literal["xla", "pallas"] = "xla"
    moe_impl: Literal["dense", "ragged", "expert_parallel"] = "ragged"
    moe_capacity_factor: float = 0.0
    moe_token_chunk: int = 0
    scan_layers: bool = True
    remat: bool = False

    def __post_init__(self):
        # Lists from JSON or ml_collections become tuples so the config stays hashable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        self._validate()

    def _validate(self):
        def fail(field, msg):
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in (
            "vocab_size",
            "embed_dim",
            "mlp_dim",
            "moe_mlp_dim",
            "num_heads",
            "num_kv_heads",
            "swa_num_kv_heads",
            "head_dim",
            "v_head_dim",
            "sliding_window",
            "num_experts",
            "num_experts_per_tok",
            "num_expert_groups",
            "topk_groups",
            "max_position_embeddings",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f, "must be a positive integer")
        if not isinstance(self.num_mtp_layers, int) or self.num_mtp_layers < 0:
            fail("num_mtp_layers", "must be a non-negative integer")
        if not self.layer_types:
            fail("layer_types", "needs at least one layer")
        bad = [t for t in self.layer_types if t not in (FULL, SLIDING)]
        if bad:
            fail("layer_types", f"entries must be {FULL!r} or {SLIDING!r}; found {bad[0]!r}")
        bad = [t for t in self.mlp_layer_types if t not in (DENSE, SPARSE)]
        if bad:
            fail("mlp_layer_types", f"entries must be {DENSE!r} or {SPARSE!r}; found {bad[0]!r}")
        if len(self.mlp_layer_types) != len(self.layer_types):
            fail(
                "mlp_layer_types",
                f"has {len(self.mlp_layer_types)} entries but layer_types has "
                f"{len(self.layer_types)}; both list one entry per layer",
            )
        for f, k in (
            ("num_kv_heads", self.num_kv_heads),
            ("swa_num_kv_heads", self.swa_num_kv_heads),
        ):
            if self.num_heads % k:
                fail(f, f"num_heads={self.num_heads} must be a multiple of it (GQA groups)")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            fail(
                "partial_rotary_factor",
                f"int(head_dim * factor) = {self.rotary_dim} must be even and in (0, head_dim]",
            )
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"exceeds num_experts={self.num_experts}")
        if self.num_experts % self.num_expert_groups:
            fail("num_expert_groups", f"must divide num_experts={self.num_experts}")
        if self.topk_groups > self.num_expert_groups:
            fail("topk_groups", f"exceeds num_expert_groups={self.num_expert_groups}")
        per_group = self.num_experts // self.num_expert_groups
        if self.num_expert_groups > 1 and per_group < 2:
            fail("num_expert_groups", "group scores sum the top-2 experts: need >= 2 per group")
        if self.num_experts_per_tok > self.topk_groups * per_group:
            fail(
                "num_experts_per_tok",
                f"exceeds the {self.topk_groups * per_group} experts in the kept groups",
            )
        for f in ("rope_theta", "swa_rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            if not getattr(self, f) > 0:
                fail(f, "must be positive")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f, f"must be one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", f"must be one of {MOE_IMPLS}")
        if self.moe_capacity_factor < 0:
            fail("moe_capacity_factor", "must be >= 0 (0 = dropless)")
        if self.moe_token_chunk < 0:
            fail("moe_token_chunk", "must be >= 0 (0 = all tokens at once)")

    # ----------------------------------------------------------------------------------------
    # Derived values.

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Presets.


def mimo_v2_flash(**overrides) -> ModelConfig:
    """The released XiaomiMiMo/MiMo-V2-Flash architecture (309B total, 15B active)."""
    return ModelConfig(**overrides)


def tiny(**overrides) -> ModelConfig:
    """A small model with the real structure: one dense GA layer, then SWA x5 + GA periods.

    Prime-ish dims so shape bugs surface; fp32 so it trains and tests on CPU.
    """
    n = overrides.pop("num_layers", 13)
    base = dict(
        vocab_size=256,
        embed_dim=64,
        mlp_dim=160,
        moe_mlp_dim=48,
        num_heads=4,
        num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=24,
        v_head_dim=16,
        layer_types=layer_pattern(n)[0],
        mlp_layer_types=layer_pattern(n)[1],
        sliding_window=17,
        num_experts=8,
        num_experts_per_tok=2,
        num_mtp_layers=3,
        max_position_embeddings=4096,
        dtype="float32",
        param_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


def from_config_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from an ml_collections ``config.model`` dict.

    Besides the ModelConfig fields, the dict may give the layer pattern compactly (used when
    ``layer_types`` is empty): ``num_layers``, ``num_dense_layers`` (leading dense-FFN layers) and
    ``global_every`` (layer i is global when i == 0 or (i + 1) % global_every == 0).

    Raises:
      ValueError: naming any key that is not a ModelConfig field or a pattern key.
    """
    d = dict(d)
    n = d.pop("num_layers", None)
    dense = d.pop("num_dense_layers", NUM_DENSE_LAYERS)
    every = d.pop("global_every", GLOBAL_EVERY)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config.model: unknown field(s) {unknown}; valid: {sorted(known)}")
    if d.get("layer_types"):
        if n is not None and n != len(d["layer_types"]):
            raise ValueError(
                f"config.model: num_layers={n} but layer_types lists {len(d['layer_types'])}"
            )
    else:
        if n is None:
            raise ValueError("config.model: give either layer_types or num_layers")
        d["layer_types"], d["mlp_layer_types"] = layer_pattern(n, every, dense)
    return ModelConfig(**d)
