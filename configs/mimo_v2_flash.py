"""The released MiMo-V2-Flash architecture (309B total / 15B active), bf16."""

import dataclasses

from configs.base import base_config, model_dict
from mimo_jax.config import mimo_v2_flash


def get_config():
    c = base_config()
    fields = dataclasses.asdict(mimo_v2_flash())
    c.model = model_dict(**fields)
    return c
