"""ModelConfig: every architectural number of MiMo-V2-Flash, validated, with HF conversion.

``ModelConfig.from_hf`` reads both dialects of ``config.json``: the hub's remote-code keys
(``hybrid_layer_pattern``, ``moe_layer_freq``, ``swa_*``, ``sliding_window_size``, ...) and the
transformers-native keys (``layer_types``, ``mlp_layer_types``, ``rope_parameters``, ...).
``to_hf`` writes the transformers-native form, which ``MiMoV2FlashConfig`` loads directly.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

FULL = "full_attention"
SLIDING = "sliding_attention"
DENSE = "dense"
SPARSE = "sparse"

ATTENTION_IMPLS = ("xla", "pallas")
MOE_IMPLS = ("dense", "ragged", "expert_parallel")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a MiMo-V2-Flash model (the defaults are the released 309B model).

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
    layer_types: tuple[str, ...] = tuple(
        FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(48)
    )
    mlp_layer_types: tuple[str, ...] = (DENSE,) + (SPARSE,) * 47
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

    # ----------------------------------------------------------------------------------------
    # HF conversion.

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Builds a config from an HF ``config.json`` dict (hub or transformers-native keys).

        Args:
          hf: the parsed config.json.
          **overrides: ModelConfig fields to set on top (e.g. dtype, moe_impl).

        Returns:
          The validated ModelConfig. ``num_mtp_layers`` is 0 when the dict does not state it
          (``load_hf`` then counts the MTP tensors in the checkpoint).
        """
        hf = dict(hf)
        n = _get(hf, "num_hidden_layers", int)
        kw: dict[str, Any] = {}
        kw["vocab_size"] = _get(hf, "vocab_size", int)
        kw["embed_dim"] = _get(hf, "hidden_size", int)
        kw["mlp_dim"] = _get(hf, "intermediate_size", int)
        kw["moe_mlp_dim"] = _get(hf, "moe_intermediate_size", int)
        kw["num_heads"] = _get(hf, "num_attention_heads", int)
        kw["num_kv_heads"] = _get(hf, "num_key_value_heads", int)
        kw["head_dim"] = _get(hf, "head_dim", int)
        kw["v_head_dim"] = _get(hf, "v_head_dim", int)
        kw["num_experts"] = _get(hf, "n_routed_experts", int)
        kw["num_experts_per_tok"] = _get(hf, "num_experts_per_tok", int)
        kw["num_expert_groups"] = hf.get("n_group") or 1
        kw["topk_groups"] = hf.get("topk_group") or 1
        kw["norm_topk_prob"] = bool(hf.get("norm_topk_prob", True))
        rsf = hf.get("routed_scaling_factor")
        kw["routed_scaling_factor"] = 1.0 if rsf is None else float(rsf)
        vs = hf.get("attention_value_scale")
        kw["attention_value_scale"] = 1.0 if vs is None else float(vs)
        kw["rms_norm_eps"] = float(hf.get("rms_norm_eps", hf.get("layernorm_epsilon", 1e-5)))
        kw["max_position_embeddings"] = int(hf.get("max_position_embeddings", 262144))
        kw["initializer_range"] = float(hf.get("initializer_range", 0.02))
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tok = hf.get(f)
            # Several eos ids are legal in HF; generation stops on the first listed.
            kw[f] = tok[0] if isinstance(tok, list) and tok else tok
        if hf.get("tie_word_embeddings", False):
            raise ValueError("config.json: tie_word_embeddings=true is not MiMo-V2-Flash (untied)")
        if hf.get("n_shared_experts"):
            raise ValueError(
                f"config.json: n_shared_experts={hf['n_shared_experts']}: MiMo-V2-Flash has none"
            )
        scoring = hf.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"config.json: scoring_func={scoring!r}; only 'sigmoid' is supported")
        if hf.get("num_nextn_predict_layers") is not None:
            kw["num_mtp_layers"] = int(hf["num_nextn_predict_layers"])
        else:
            kw["num_mtp_layers"] = 0

        hub = any(
            k in hf for k in ("hybrid_layer_pattern", "sliding_window_size", "swa_rope_theta")
        )
        if hub:
            kw.update(_from_hub_keys(hf, n, kw))
        else:
            kw.update(_from_native_keys(hf, n, kw))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The transformers-native ``config.json`` dict for this model.

        Raises:
          ValueError: if the model cannot be expressed in transformers' MiMoV2FlashConfig
            (which fixes SWA kv heads at 2 * num_kv_heads and sinks on SWA layers only).
        """
        if self.swa_num_kv_heads != 2 * self.num_kv_heads:
            raise ValueError(
                f"swa_num_kv_heads={self.swa_num_kv_heads} != 2 * num_kv_heads="
                f"{2 * self.num_kv_heads}: transformers' MiMoV2FlashConfig cannot express it"
            )
        if not self.swa_attention_sink or self.full_attention_sink:
            raise ValueError(
                "transformers' MiMoV2FlashConfig has sinks on SWA layers only "
                f"(swa_attention_sink={self.swa_attention_sink}, "
                f"full_attention_sink={self.full_attention_sink})"
            )

        def rope(theta):
            return {
                "rope_type": "default",
                "rope_theta": theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            }

        return {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.mlp_dim,
            "moe_intermediate_size": self.moe_mlp_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "hidden_act": "silu",
            "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {FULL: rope(self.rope_theta), SLIDING: rope(self.swa_rope_theta)},
            "attention_value_scale": self.attention_value_scale,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.num_expert_groups,
            "topk_group": self.topk_groups,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            # Not a transformers field (it ignores MTP); kept so the MTP depth round-trips.
            "num_nextn_predict_layers": self.num_mtp_layers,
            "torch_dtype": self.param_dtype,
        }


def _get(hf: Mapping[str, Any], key: str, typ):
    if key not in hf:
        raise ValueError(f"config.json: missing required key {key!r}")
    v = hf[key]
    if typ is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise ValueError(f"config.json: {key}={v!r} must be an integer")
    return v


def _per_layer(hf: Mapping[str, Any], key: str, n: int) -> Sequence:
    v = hf[key]
    if not isinstance(v, list | tuple) or len(v) != n:
        raise ValueError(
            f"config.json: {key} must list one entry per layer (num_hidden_layers={n}); got "
            f"{len(v) if isinstance(v, list | tuple) else type(v).__name__}"
        )
    return v


def _from_hub_keys(hf: Mapping[str, Any], n: int, kw: Mapping[str, Any]) -> dict[str, Any]:
    """Reads the remote-code (hub) dialect: 1/0 patterns, swa_* keys, window without the query."""
    out: dict[str, Any] = {}
    if "hybrid_layer_pattern" in hf and hf["hybrid_layer_pattern"] is not None:
        pattern = _per_layer(hf, "hybrid_layer_pattern", n)
        if any(p not in (0, 1) for p in pattern):
            raise ValueError(
                "config.json: hybrid_layer_pattern entries must be 0 (global) or 1 (SWA)"
            )
        out["layer_types"] = tuple(SLIDING if p == 1 else FULL for p in pattern)
    else:
        out["layer_types"] = tuple(
            FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n)
        )
    if "moe_layer_freq" in hf and isinstance(hf["moe_layer_freq"], list):
        freq = _per_layer(hf, "moe_layer_freq", n)
        if any(f not in (0, 1) for f in freq):
            raise ValueError("config.json: moe_layer_freq entries must be 0 (dense) or 1 (MoE)")
        out["mlp_layer_types"] = tuple(SPARSE if f else DENSE for f in freq)
    else:
        out["mlp_layer_types"] = (DENSE,) + (SPARSE,) * (n - 1)
    for key, ours in (
        ("swa_num_attention_heads", kw["num_heads"]),
        ("swa_head_dim", kw["head_dim"]),
        ("swa_v_head_dim", kw["v_head_dim"]),
    ):
        if hf.get(key) is not None and hf[key] != ours:
            raise ValueError(
                f"config.json: {key}={hf[key]} differs from the global-layer value {ours}; "
                "MiMo-V2-Flash shares it between layer types and so does this port"
            )
    out["swa_num_kv_heads"] = int(hf.get("swa_num_key_value_heads", 2 * kw["num_kv_heads"]))
    if hf.get("sliding_window_size") is not None:
        # The hub counts previous tokens; SGLang (the reference engine) also attends to the query.
        out["sliding_window"] = int(hf["sliding_window_size"]) + 1
    else:
        out["sliding_window"] = int(_get(hf, "sliding_window", int))
    out["rope_theta"] = float(hf.get("rope_theta", 5_000_000.0))
    out["swa_rope_theta"] = float(hf.get("swa_rope_theta", 10_000.0))
    out["partial_rotary_factor"] = float(hf.get("partial_rotary_factor", 0.334))
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']!r} is not supported")
    out["swa_attention_sink"] = bool(hf.get("add_swa_attention_sink_bias", True))
    out["full_attention_sink"] = bool(hf.get("add_full_attention_sink_bias", False))
    return out


def _from_native_keys(hf: Mapping[str, Any], n: int, kw: Mapping[str, Any]) -> dict[str, Any]:
    """Reads the transformers-native dialect (``layer_types``, ``rope_parameters``, ...)."""
    out: dict[str, Any] = {}
    if hf.get("layer_types") is not None:
        out["layer_types"] = tuple(_per_layer(hf, "layer_types", n))
    else:
        out["layer_types"] = tuple(
            FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n)
        )
    if hf.get("mlp_layer_types") is not None:
        out["mlp_layer_types"] = tuple(_per_layer(hf, "mlp_layer_types", n))
    else:
        out["mlp_layer_types"] = (DENSE,) + (SPARSE,) * (n - 1)
    # transformers derives the SWA kv heads; it has no key for them.
    out["swa_num_kv_heads"] = 2 * kw["num_kv_heads"]
    out["sliding_window"] = int(hf.get("sliding_window", 129))
    rp = hf.get("rope_parameters")
    if rp is None:
        out["rope_theta"], out["swa_rope_theta"], out["partial_rotary_factor"] = 5e6, 1e4, 0.334
    else:
        for t in (FULL, SLIDING):
            if t not in rp:
                raise ValueError(f"config.json: rope_parameters lacks the {t!r} entry")
            if rp[t].get("rope_type", "default") != "default":
                raise ValueError(
                    f"config.json: rope_parameters[{t!r}].rope_type={rp[t]['rope_type']!r}; "
                    "only 'default' is supported"
                )
        out["rope_theta"] = float(rp[FULL]["rope_theta"])
        out["swa_rope_theta"] = float(rp[SLIDING]["rope_theta"])
        factors = {rp[t].get("partial_rotary_factor", 0.334) for t in (FULL, SLIDING)}
        if len(factors) != 1:
            raise ValueError(
                "config.json: rope_parameters has different partial_rotary_factor per layer type"
            )
        out["partial_rotary_factor"] = float(factors.pop())
    out["swa_attention_sink"] = True
    out["full_attention_sink"] = False
    return out


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
        layer_types=tuple(FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n)),
        mlp_layer_types=(DENSE,) + (SPARSE,) * (n - 1),
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
    dense = d.pop("num_dense_layers", 1)
    every = d.pop("global_every", 6)
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
        d["layer_types"] = tuple(
            FULL if (i == 0 or (i + 1) % every == 0) else SLIDING for i in range(n)
        )
        d["mlp_layer_types"] = (DENSE,) * dense + (SPARSE,) * (n - dense)
    return ModelConfig(**d)
