"""Checkpoint helpers shared by the HF checkpoint tests (test_hf.py, test_hf_errors.py)."""

import json
import os

import numpy as np
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimo_jax import hf


def flat_state(model) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_states_equal(a, b):
    sa, sb = flat_state(a), flat_state(b)
    assert sa.keys() == sb.keys(), f"state paths differ: {sorted(set(sa) ^ set(sb))[:5]}"
    for path in sa:
        x, y = sa[path], sb[path]
        assert x.dtype == y.dtype, f"{path}: dtype {x.dtype} != {y.dtype}"
        assert np.array_equal(x, y), (
            f"{path}: not bit-exact, max diff {np.abs(x.astype(np.float64) - y).max():.3g}"
        )


def read_dir(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all shards)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def write_dir(path, tensors: dict[str, torch.Tensor], config: dict):
    """A single-file checkpoint (no index) as transformers writes small models."""
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def read_config(path) -> dict:
    """The checkpoint's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def assert_checkpoints_equal(d1, d2):
    with open(os.path.join(d1, hf.INDEX_FILE)) as f1, open(os.path.join(d2, hf.INDEX_FILE)) as f2:
        m1, m2 = json.load(f1)["weight_map"], json.load(f2)["weight_map"]
    assert m1.keys() == m2.keys(), f"tensor names differ: {sorted(set(m1) ^ set(m2))[:5]}"
    for name in m1:
        with (
            safe_open(os.path.join(d1, m1[name]), "numpy") as a,
            safe_open(os.path.join(d2, m2[name]), "numpy") as b,
        ):
            x, y = a.get_tensor(name), b.get_tensor(name)
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        )
        assert np.array_equal(x, y), (
            f"{name}: not bit-exact, max diff {np.abs(x.astype(np.float64) - y).max():.3g}"
        )
    assert read_config(d1) == read_config(d2)
