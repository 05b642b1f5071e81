"""The post-training policy: the run's tasks, and its model initialised from ``config.init_from``.

SFT and RL start from a pre-trained workdir (or an SFT workdir), an HF checkpoint directory, or
random weights. Only the model state (parameters and the router's expert biases) is taken from
the source, never its optimizer state: a post-training run starts its own optimizer.
"""

import dataclasses
import math
import os

import ml_collections

from mimo_jax import checkpoint, hf
from mimo_jax import sharding as sh
from mimo_jax.config import ModelConfig
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import prompt_file, tasks
from mimo_jax.train import architecture_diff

# Fields an HF config.json does not hold or that only say how this run computes: taken from the
# run's model config.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "moe_impl", "moe_capacity_factor",
                   "moe_token_chunk", "scan_layers", "remat")  # fmt: skip


def task_from_config(config: ml_collections.ConfigDict) -> tasks.Task:
    """``tasks.get_task(config.task.name, **config.task.options)``.

    Raises:
      ValueError: naming ``config.task.name`` (and its options) for an unknown task or bad
        options.
    """
    name, options = config.task.name, dict(config.task.options)
    try:
        return tasks.get_task(name, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.task.name={name!r} with options {options}: {e}") from e


def mixture_from_config(config: ml_collections.ConfigDict) -> tasks.Mixture:
    """The run's prompt sources: ``config.domains`` if non-empty, else ``config.task`` alone.

    Each ``config.domains.<domain>`` holds ``task`` (a ``tasks.TASKS`` name, or ``"jsonl"``
    for prompts from a file without a verifier: ``prompt_file.PromptFile``), ``options``
    (keyword options of that task, may be absent) and ``weight`` (prompt-sampling weight > 0,
    default 1.0); other fields of an entry are left to their readers. Domains come in the order
    ``ConfigDict`` iterates them: sorted by name.

    Returns:
      the mixture; without ``config.domains``, the one domain ``config.task.name`` with the task
      of ``task_from_config`` (so it draws exactly that task's prompts and SFT rows).

    Raises:
      ValueError: naming the bad field (``config.domains.<domain>.task`` and so on).
    """
    domains = config.get("domains")
    if not domains:
        return tasks.Mixture({config.task.name: task_from_config(config)})
    if not isinstance(domains, ml_collections.ConfigDict):
        raise ValueError(f"config.domains={domains!r} must be a ConfigDict of domains")
    by_domain, weights = {}, {}
    for domain, entry in domains.items():
        field = f"config.domains.{domain}"
        if not isinstance(entry, ml_collections.ConfigDict) or not entry.get("task"):
            raise ValueError(f"{field} must be a ConfigDict with a task name, got {entry!r}")
        name, options = entry.task, dict(entry.get("options") or {})
        try:
            if name == prompt_file.NAME:
                by_domain[domain] = prompt_file.PromptFile(**options)
            else:
                by_domain[domain] = tasks.get_task(name, **options)
        except (TypeError, ValueError, OSError) as e:
            raise ValueError(f"{field}.task={name!r} with options {options}: {e}") from e
        weight = entry.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0 < weight < math.inf
        ):
            raise ValueError(f"{field}.weight={weight!r} must be a finite number > 0")
        weights[domain] = float(weight)
    return tasks.Mixture(by_domain, weights)


def init_model(
    config: ml_collections.ConfigDict, cfg: ModelConfig, *, init_from: str
) -> MiMoV2Flash:
    """The run's model, sharded under the current mesh, initialised from ``init_from``.

    Args:
      config: the run's config (``seed`` for a random init; ``init_from`` is named in errors).
      cfg: the run's model config (``train.model_config(config)``).
      init_from: "" for a random init with ``config.seed``; a workdir (``model_config.json``
        and checkpoints: its latest step's model state); or an HF checkpoint directory
        (``config.json`` and safetensors, loaded with ``hf.load_hf``).

    Returns:
      The model, every parameter in the layout of the current mesh and rules.

    Raises:
      ValueError: naming ``config.init_from``: neither kind of directory, a workdir without a
        checkpoint, or a source whose architecture differs from ``cfg`` (listing the fields).
    """
    if not init_from:
        return sh.create_model(cfg, config.seed)
    if os.path.isfile(os.path.join(init_from, checkpoint.CONFIG_FILE)):
        saved = checkpoint.load_model_config(init_from)
        # Weights are stored per leaf and cast on restore: their storage dtype may differ.
        _check_architecture(dataclasses.replace(saved, param_dtype=cfg.param_dtype), cfg, init_from)
        return restore_workdir(init_from, cfg, where=f"config.init_from={init_from!r}")
    if os.path.isfile(os.path.join(init_from, "config.json")):
        model = hf.load_hf(init_from, **{f: getattr(cfg, f) for f in _RUNTIME_FIELDS})
        _check_architecture(model.cfg, cfg, init_from)
        return model
    raise ValueError(
        f"config.init_from={init_from!r} must be empty (random init), a mimo-jax workdir (with "
        f"{checkpoint.CONFIG_FILE} and checkpoints) or an HF checkpoint directory (with "
        "config.json and *.safetensors)"
    )


def restore_workdir(workdir: str, cfg: ModelConfig, *, where: str) -> MiMoV2Flash:
    """A model of ``cfg``, sharded under the current mesh, holding ``workdir``'s latest model
    state (parameters and router biases; the optimizer state is not read).

    Args:
      workdir: a mimo-jax workdir with checkpoints.
      cfg: the model config to build (the workdir's architecture, any dtype).
      where: the config field that named ``workdir``, for errors.

    Raises:
      ValueError: naming ``where`` when the workdir holds no checkpoint.
    """
    model = sh.create_model(cfg, 0)
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        if ckpt.latest_step() is None:
            raise ValueError(
                f"{where} holds {checkpoint.CONFIG_FILE} but no checkpoint in {ckpt.directory}"
            )
        ckpt.restore(model)  # the model item only: the source's optimizer state stays
    finally:
        ckpt.close()
    return model


def _check_architecture(source: ModelConfig, cfg: ModelConfig, init_from: str) -> None:
    diff = architecture_diff(source, cfg)
    if diff:
        values = ", ".join(f"{f}: {getattr(source, f)!r} vs {getattr(cfg, f)!r}" for f in diff)
        raise ValueError(
            f"config.init_from={init_from!r} holds another architecture than config.model "
            f"(source vs run: {values})"
        )
