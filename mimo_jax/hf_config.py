"""ModelConfig from and to HF ``config.json``, in both of its dialects.

``config_from_hf`` reads the hub's remote-code keys (``hybrid_layer_pattern``,
``moe_layer_freq``, ``swa_*``, ``sliding_window_size``, ...) and the transformers-native keys
(``layer_types``, ``mlp_layer_types``, ``rope_parameters``, ...). ``config_to_hf`` writes the
transformers-native form, which transformers' ``MiMoV2FlashConfig`` loads directly. A key
missing from a dict takes the released model's value (the ``ModelConfig`` defaults).
"""

from collections.abc import Mapping, Sequence
from typing import Any

from mimo_jax.config import DENSE, FULL, SLIDING, SPARSE, ModelConfig, layer_pattern


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """Builds a config from an HF ``config.json`` dict (hub or transformers-native keys).

    Args:
      hf: the parsed config.json.
      **overrides: ModelConfig fields to set on top (e.g. dtype, moe_impl).

    Returns:
      The validated ModelConfig. ``num_mtp_layers`` is 0 when the dict does not state it
      (``hf.load_hf`` then counts the MTP tensors in the checkpoint).

    Raises:
      ValueError: naming the key, for a missing required key, a malformed value, or a feature
        MiMo-V2-Flash does not have (tied embeddings, shared experts, rope scaling, ...).
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
    kw["max_position_embeddings"] = int(
        hf.get("max_position_embeddings", ModelConfig.max_position_embeddings)
    )
    kw["initializer_range"] = float(hf.get("initializer_range", ModelConfig.initializer_range))
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

    hub = any(k in hf for k in ("hybrid_layer_pattern", "sliding_window_size", "swa_rope_theta"))
    if hub:
        kw.update(_from_hub_keys(hf, n, kw))
    else:
        kw.update(_from_native_keys(hf, n, kw))
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers-native ``config.json`` dict of a model.

    Args:
      cfg: the model config.

    Returns:
      A JSON-serialisable dict that ``MiMoV2FlashConfig(**d)`` accepts.

    Raises:
      ValueError: if the model cannot be expressed in transformers' MiMoV2FlashConfig
        (which fixes SWA kv heads at 2 * num_kv_heads and sinks on SWA layers only).
    """
    if cfg.swa_num_kv_heads != 2 * cfg.num_kv_heads:
        raise ValueError(
            f"swa_num_kv_heads={cfg.swa_num_kv_heads} != 2 * num_kv_heads="
            f"{2 * cfg.num_kv_heads}: transformers' MiMoV2FlashConfig cannot express it"
        )
    if not cfg.swa_attention_sink or cfg.full_attention_sink:
        raise ValueError(
            "transformers' MiMoV2FlashConfig has sinks on SWA layers only "
            f"(swa_attention_sink={cfg.swa_attention_sink}, "
            f"full_attention_sink={cfg.full_attention_sink})"
        )

    def rope(theta):
        return {
            "rope_type": "default",
            "rope_theta": theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
        }

    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "moe_intermediate_size": cfg.moe_mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "layer_types": list(cfg.layer_types),
        "mlp_layer_types": list(cfg.mlp_layer_types),
        "sliding_window": cfg.sliding_window,
        "rope_parameters": {FULL: rope(cfg.rope_theta), SLIDING: rope(cfg.swa_rope_theta)},
        "attention_value_scale": cfg.attention_value_scale,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.num_expert_groups,
        "topk_group": cfg.topk_groups,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        # Not a transformers field (it ignores MTP); kept so the MTP depth round-trips.
        "num_nextn_predict_layers": cfg.num_mtp_layers,
        "torch_dtype": cfg.param_dtype,
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
        out["layer_types"] = layer_pattern(n)[0]
    if "moe_layer_freq" in hf and isinstance(hf["moe_layer_freq"], list):
        freq = _per_layer(hf, "moe_layer_freq", n)
        if any(f not in (0, 1) for f in freq):
            raise ValueError("config.json: moe_layer_freq entries must be 0 (dense) or 1 (MoE)")
        out["mlp_layer_types"] = tuple(SPARSE if f else DENSE for f in freq)
    else:
        out["mlp_layer_types"] = layer_pattern(n)[1]
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
    out["rope_theta"] = float(hf.get("rope_theta", ModelConfig.rope_theta))
    out["swa_rope_theta"] = float(hf.get("swa_rope_theta", ModelConfig.swa_rope_theta))
    out["partial_rotary_factor"] = float(
        hf.get("partial_rotary_factor", ModelConfig.partial_rotary_factor)
    )
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
        out["layer_types"] = layer_pattern(n)[0]
    if hf.get("mlp_layer_types") is not None:
        out["mlp_layer_types"] = tuple(_per_layer(hf, "mlp_layer_types", n))
    else:
        out["mlp_layer_types"] = layer_pattern(n)[1]
    # transformers derives the SWA kv heads; it has no key for them.
    out["swa_num_kv_heads"] = 2 * kw["num_kv_heads"]
    out["sliding_window"] = int(hf.get("sliding_window", ModelConfig.sliding_window))
    rp = hf.get("rope_parameters")
    if rp is None:
        out["rope_theta"] = ModelConfig.rope_theta
        out["swa_rope_theta"] = ModelConfig.swa_rope_theta
        out["partial_rotary_factor"] = ModelConfig.partial_rotary_factor
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
        factors = {
            rp[t].get("partial_rotary_factor", ModelConfig.partial_rotary_factor)
            for t in (FULL, SLIDING)
        }
        if len(factors) != 1:
            raise ValueError(
                "config.json: rope_parameters has different partial_rotary_factor per layer type"
            )
        out["partial_rotary_factor"] = float(factors.pop())
    out["swa_attention_sink"] = True
    out["full_attention_sink"] = False
    return out
