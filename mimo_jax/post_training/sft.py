"""Supervised fine-tuning (``main.py --mode=sft``): the loss on response tokens only.

``run(config, workdir)`` trains on prompt/response examples (``config.sft.data``: the synthetic
SFT split of the run's tasks, ``policy.mixture_from_config``, or a JSONL file, ``sft_data``) with
the pre-training loop
(``train.run_loop``), so it keeps pre-training's guarantees: batches are a pure function of
(seed, step), a killed run resumes from its workdir's latest checkpoint onto the same curve,
checkpoints every ``config.train.checkpoint_every`` steps and at the end, metrics every
``log_every`` steps to stdout, ``metrics.jsonl`` and TensorBoard. A new run starts from
``config.init_from`` (``policy.init_model``); a workdir's own checkpoint takes precedence.

Loss of a batch (labels, ``loss_mask`` and the MTP targets from ``sft_data``):
CE over response labels + (mtp_loss_weight / D) * sum_k CE_k over the depth-k response labels
+ aux_loss_weight * sequence balance loss. Prompt and padding labels carry no weight.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimo_jax import checkpoint, data
from mimo_jax import sharding as sh
from mimo_jax.config import ModelConfig
from mimo_jax.loss import chunked_cross_entropy, cross_entropy
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import policy, rollout, sft_data, tasks
from mimo_jax.post_training.agent import episodes
from mimo_jax.progress import Progress
from mimo_jax.train import (
    _check_same_model,
    _check_workdir,
    check_batch_shards,
    check_tokenizer_fits,
    learning_rate_schedule,
    make_optimizer,
    mean_dropped_fraction,
    model_config,
    run_loop,
)


def check_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Raises ValueError naming the first bad ``config.sft`` / ``config.train`` field."""
    sc, tc = config.sft, config.train
    if not isinstance(sc.data, str) or not sc.data:
        raise ValueError(f'config.sft.data={sc.data!r} must be "task" or a JSONL path')
    if sc.num_examples < 0 or (sc.data == "task" and sc.num_examples == 0):
        raise ValueError(
            f"config.sft.num_examples={sc.num_examples} must be > 0 for task data, >= 0 for "
            "JSONL (0 keeps every example)"
        )
    if sc.heldout_prompts < 0:
        raise ValueError(f"config.sft.heldout_prompts={sc.heldout_prompts} must be >= 0 (0: off)")
    if sc.packing and cfg.attention_impl != "xla":
        raise ValueError(
            "config.sft.packing=True needs config.model.attention_impl='xla' (attention "
            f"restricted to each example), got {cfg.attention_impl!r}"
        )
    for field in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                  "checkpoint_every"):  # fmt: skip
        if tc[field] < 1:
            raise ValueError(f"config.train.{field}={tc[field]} must be >= 1")


def load_dataset(
    config: ml_collections.ConfigDict, tokenizer: data.Tokenizer
) -> tuple[sft_data.SFTDataset, tasks.Mixture | None]:
    """The run's SFT examples, tokenised: ``config.sft.data`` = "task" or a JSONL path.

    "task" takes ``num_examples`` rows of the mixture of ``config.domains`` (split by weight)
    or, without domains, of ``config.task`` alone (exactly ``task.sft_examples``'s rows).

    Returns:
      (the dataset, the mixture whose held-out success is measured; None for JSONL data).
    """
    sc = config.sft
    mixture, source = None, sc.data
    if episodes.is_agent(config):  # every model turn of scripted successful episodes
        if sc.data != "task":
            raise ValueError(f'config.sft.data={sc.data!r}: an agent run takes its SFT rows from '
                             'its task suite (config.sft.data = "task")')  # fmt: skip
        rows, source = episodes.sft_examples(config, tokenizer), "task:agent"
    elif sc.data == "task":
        # Through the Task, not load_examples("task:..."): the configured options apply.
        mixture = policy.mixture_from_config(config)
        rows = mixture.sft_examples(config.seed, sc.num_examples)
        source = "task:" + "+".join(mixture.domains)
    else:
        try:
            rows = sft_data.load_examples(sc.data, num_examples=sc.num_examples)
        except OSError as e:
            raise ValueError(
                f'config.sft.data={sc.data!r} is neither "task" nor a readable JSONL file: {e}'
            ) from e
    return sft_data.SFTDataset(rows, tokenizer, config.train.seq_len, source=source), mixture


def host_batch(
    dataset: sft_data.SFTDataset, config: ml_collections.ConfigDict, step: int, depth: int
) -> dict:
    """The train step's batch of ``step``: A = ``grad_accum`` SFT batches, a pure function of
    (``config.seed``, step).

    Returns:
      ``{"ids", "labels", "loss_mask", "positions", "segment_ids"}`` [A, B, T] and
      ``"mtp"``: D pairs (labels, mask) [A, B, T] (``sft_data.mtp_targets``).
    """
    tc = config.train
    parts = []
    for a in range(tc.grad_accum):
        b = dataset.batch(
            batch_size=tc.batch_size, seed=config.seed, step=step * tc.grad_accum + a,
            packing=config.sft.packing,
        )  # fmt: skip
        parts.append(
            {
                "ids": b.ids, "labels": b.labels, "loss_mask": b.loss_mask,
                "positions": b.positions, "segment_ids": b.segment_ids,
                "mtp": sft_data.mtp_targets(b, depth),
            }
        )  # fmt: skip
    return jax.tree.map(lambda *xs: np.stack(xs), *parts)


def make_loss_fn(cfg: ModelConfig, tc: ml_collections.ConfigDict, *, packing: bool):
    """``loss_fn(model, batch)`` for ``train.make_train_step``: the SFT loss (module doc).

    Args:
      cfg: the model config.
      tc: ``config.train`` (``mtp_loss_weight``, ``aux_loss_weight``, ``loss_chunk``,
        ``grad_accum``).
      packing: pass the batch's ``segment_ids`` so attention stays within each example.

    Returns:
      ``loss_fn(model, micro_batch) -> (loss, (metrics, expert_load [L, E]))``; ``micro_batch``
      is one slice of ``host_batch``. Metrics: ``ce`` and ``mtp_ce_<k>`` (response tokens),
      ``aux_loss``, ``loss``, ``dropped_fraction``, ``response_tokens`` (per optimizer step).
    """

    def loss_fn(model: MiMoV2Flash, batch: dict):
        chunk = tc.loss_chunk
        out = model(
            batch["ids"], batch["positions"], logits=not chunk,
            segment_ids=batch["segment_ids"] if packing else None,
        )  # fmt: skip
        if chunk:
            ce_of = functools.partial(chunked_cross_entropy, model.logits, chunk=chunk)
            heads = (out.hidden, *out.mtp_hidden)
        else:
            ce_of, heads = cross_entropy, (out.logits, *out.mtp_logits)
        ce = ce_of(heads[0], batch["labels"], batch["loss_mask"])
        metrics = {"ce": ce}
        loss = ce
        for k, (x, (labels, mask)) in enumerate(zip(heads[1:], batch["mtp"], strict=True)):
            metrics[f"mtp_ce_{k}"] = ce_of(x, labels, mask)
            loss = loss + tc.mtp_loss_weight / len(batch["mtp"]) * metrics[f"mtp_ce_{k}"]
        metrics["aux_loss"] = jnp.sum(out.aux["seq_aux_loss"])
        loss = loss + tc.aux_loss_weight * metrics["aux_loss"]
        metrics["loss"] = loss
        metrics["dropped_fraction"] = mean_dropped_fraction(cfg, out.aux)
        # make_train_step averages metrics over the A micro-batches: scaled back to a sum.
        metrics["response_tokens"] = jnp.sum(batch["loss_mask"]) * tc.grad_accum
        return loss, (metrics, out.aux["expert_load"])

    return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """SFT of ``config.init_from`` (or random weights) on ``config.sft.data``, into ``workdir``.

    Args:
      config: ml_collections config with ``model``, ``task`` (or ``domains``: a mixture),
        ``train`` (optimizer and loop) and ``sft`` (data, num_examples, packing,
        heldout_prompts); see configs/rl_tiny.py.
      workdir: run directory for ``model_config.json``, checkpoints and metrics; a run there
        resumes from its latest checkpoint.

    Returns:
      The last logged metrics (with ``heldout_success`` when the data is the tasks'; with
      several domains also ``heldout_success_<domain>`` each, ``heldout_success`` their mean).
    """
    tc = config.train
    cfg = model_config(config)
    # Bad settings fail here, before the workdir is created or the data tokenised.
    learning_rate_schedule(tc)
    check_config(config, cfg)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    check_tokenizer_fits(cfg, tokenizer)
    dataset, mixture = load_dataset(config, tokenizer)
    _check_workdir(workdir)
    _check_same_model(workdir, cfg)
    mesh = sh.make_mesh(config.mesh.shape)
    with sh.use_mesh(mesh, config.mesh.rules):
        check_batch_shards(config, mesh)
        return _sft(config, workdir, cfg, tokenizer, dataset, mixture)


def _sft(config, workdir, cfg, tokenizer, dataset, mixture) -> dict[str, float]:
    """The loop of ``run``, under the run's mesh and rules."""
    tc, sc = config.train, config.sft
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    resume = ckpt.latest_step() is not None
    # A resumed run restores everything from its own checkpoint: init_from is not read again.
    model = policy.init_model(config, cfg, init_from="" if resume else config.init_from)
    opt = sh.create_sharded(lambda: make_optimizer(model, tc))
    start = 0
    if resume:
        start = ckpt.restore(model, opt)
    elif jax.process_index() == 0:
        checkpoint.save_model_config(workdir, cfg)
    progress = Progress("step", tc.steps, start=start, every_s=math.inf)
    progress.say(
        f"SFT on {len(dataset)} examples of {sc.data} ({dataset.num_truncated} prompts "
        f"truncated, {dataset.num_dropped} dropped), from {config.init_from or 'random init'}; "
        f"{workdir}: " + (f"resuming at step {start}" if start else "new run")
        + f"; metrics every {tc.log_every} steps in metrics.jsonl"
    )  # fmt: skip
    heldout = mixture is not None and sc.heldout_prompts > 0
    agent = episodes.AgentSource(config, tokenizer) if episodes.is_agent(config) else None

    def eval_fn():
        if agent is not None:
            return agent.heldout(model)
        if not heldout:
            return {}
        return rollout.heldout_metrics(model, mixture, tokenizer, num_prompts=sc.heldout_prompts)

    return run_loop(
        model, opt, cfg, tc, workdir=workdir, ckpt=ckpt, progress=progress, start=start,
        batch_of=lambda step: host_batch(dataset, config, step, cfg.num_mtp_layers),
        eval_fn=eval_fn, loss_fn=make_loss_fn(cfg, tc, packing=sc.packing),
    )  # fmt: skip
