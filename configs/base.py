"""Shared ml_collections layout of every config: model, data, train, checkpoint, mesh."""

import ml_collections


def model_dict(**fields) -> ml_collections.ConfigDict:
    """A ``config.model`` dict: ModelConfig fields plus the compact pattern keys.

    ``num_layers`` / ``num_dense_layers`` / ``global_every`` build ``layer_types`` and
    ``mlp_layer_types`` (see ``mimo_jax.config.from_config_dict``), so
    ``--config.model.num_layers=4`` works from the command line.
    """
    return ml_collections.ConfigDict({"num_dense_layers": 1, "global_every": 6, **fields})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_dict()
    return c
