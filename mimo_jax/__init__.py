"""mimo-jax: MiMo-V2-Flash in JAX / Flax NNX.

Dimension letters used in shape comments and einsum strings: B batch, T query length, S key/value
length, D hidden, N query heads, K kv heads, G query heads per kv head, H q/k head dim, P v head
dim, F dense FFN dim, E experts, M expert FFN dim, V vocab, L layers, W window.
"""

from mimo_jax.config import ModelConfig, mimo_v2_flash, tiny
from mimo_jax.decode_output import GenerateResult
from mimo_jax.generate import generate
from mimo_jax.hf import load_hf, save_hf
from mimo_jax.hf_config import config_from_hf, config_to_hf
from mimo_jax.model import MiMoV2Flash, ModelOutput, layer_plan

__all__ = [
    "GenerateResult",
    "config_from_hf",
    "config_to_hf",
    "generate",
    "MiMoV2Flash",
    "ModelConfig",
    "ModelOutput",
    "layer_plan",
    "load_hf",
    "mimo_v2_flash",
    "save_hf",
    "tiny",
]
