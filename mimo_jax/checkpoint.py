"""Orbax checkpoints of a workdir: model state (params + router biases), optimizer state, step.

Layout of a workdir:
  model_config.json       the ModelConfig, so every mode can rebuild the architecture
  checkpoints/<step>/     orbax CheckpointManager steps (written atomically by orbax)
"""

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mimo_jax.config import ModelConfig
from mimo_jax.model import MiMoV2Flash

CONFIG_FILE = "model_config.json"


def save_model_config(workdir: str, cfg: ModelConfig) -> None:
    """Writes ``model_config.json`` atomically (temp file + rename)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.replace(path + ".tmp", path)


def load_model_config(workdir: str, **overrides) -> ModelConfig:
    """Reads ``model_config.json`` from a workdir.

    Raises:
      FileNotFoundError: if the workdir has no model config (nothing was trained or imported).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a mimo-jax workdir?")
    with open(path) as f:
        fields = json.load(f)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
    return ModelConfig(**{**fields, **overrides})


class Checkpointer:
    """Saves and restores (model state, optimizer state, step) under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3):
        """Opens (creating if needed) the checkpoint directory.

        Args:
          workdir: the run's workdir.
          max_to_keep: number of most recent steps kept on disk.
        """
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model: MiMoV2Flash, optimizer: Any = None, *, wait=True) -> None:
        """Saves a step: the model's full state (params and router correction biases) and the
        optimizer's (an ``nnx.Optimizer``), if given."""
        items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model)))}
        if optimizer is not None:
            items["opt"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, model: MiMoV2Flash, optimizer: Any = None, step: int | None = None) -> int:
        """Restores a step into ``model`` (and ``optimizer``) in place.

        Args:
          model: a model of the right architecture (abstract or concrete); updated in place.
          optimizer: optional ``nnx.Optimizer`` to update in place.
          step: the step, default the latest.

        Returns:
          The restored step.

        Raises:
          FileNotFoundError: if there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state = nnx.state(model)
        items = {"model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state)))}
        if optimizer is not None:
            opt_state = nnx.state(optimizer)
            items["opt"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state)))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises assorted types for damaged directories
            raise ValueError(
                f"checkpoint step {step} in {self.directory} is unreadable or does not match "
                f"the model ({type(e).__name__}: {e}); it was left untouched"
            ) from e
        nnx.replace_by_pure_dict(state, restored["model"])
        nnx.update(model, state)
        if optimizer is not None:
            nnx.replace_by_pure_dict(opt_state, restored["opt"])
            nnx.update(optimizer, opt_state)
        return step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree):
    """Restore targets: shape, dtype and the target's own sharding (so a checkpoint written on
    one mesh restores straight into the layout of another; None for abstract models)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def load_model(workdir: str, step: int | None = None, **overrides) -> MiMoV2Flash:
    """Rebuilds the model of a workdir and restores its latest (or given) checkpoint."""
    cfg = load_model_config(workdir, **overrides)
    model = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    ckpt = Checkpointer(workdir)
    try:
        ckpt.restore(model, step=step)
    finally:
        ckpt.close()
    return model
