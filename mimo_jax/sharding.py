"""Logical axis names for parameters and activations.

Model code names logical axes only (these constants); rule presets that map them onto the
physical mesh axes (``data``, ``fsdp``, ``expert``, ``tensor``) live here too.
"""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERT = "exp"
MOE_MLP = "moe_mlp"
LAYERS = "layers"
NORM = "norm"

# Mesh axes.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
