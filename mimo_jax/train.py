"""Training: loss with MTP, AdamW, aux-loss-free expert balancing, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` is the library entry point behind ``main.py``. Batches are
a pure function of (seed, step), so a resumed run replays exactly the batches (and losses) of an
uninterrupted one; there is no iterator state to save.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from mimo_jax import axes as ax
from mimo_jax import checkpoint, data
from mimo_jax import sharding as sh
from mimo_jax.config import SPARSE, ModelConfig, from_config_dict
from mimo_jax.generate import generate
from mimo_jax.loss import model_loss
from mimo_jax.model import MiMoV2Flash
from mimo_jax.progress import Progress, format_seconds

# ---------------------------------------------------------------------------------------------
# Optimizer and balancing.


def learning_rate_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``lr``, ``hold_steps`` at ``lr``, cosine to ``lr * min_lr_ratio``.

    The cosine ends at ``steps``. ``hold_steps=0`` is plain warmup + cosine; MiMo-V2-Flash holds
    its peak for most of pre-training (the MiMo-V2-Flash technical report, section 3;
    docs/training.md).

    Args:
      tc: ``config.train`` (lr, min_lr_ratio, warmup_steps, hold_steps, steps).

    Returns:
      An optax schedule of the step.
    """
    hold = tc.hold_steps
    if hold < 0 or (hold and tc.warmup_steps + hold >= tc.steps):
        raise ValueError(
            f"config.train.hold_steps={hold} must be >= 0 and leave steps to decay: "
            f"warmup_steps + hold_steps < steps = {tc.steps}"
        )
    warmup = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    cosine = optax.cosine_decay_schedule(
        tc.lr, max(tc.steps - tc.warmup_steps - hold, 1), alpha=tc.min_lr_ratio
    )
    return optax.join_schedules(
        [warmup, optax.constant_schedule(tc.lr), cosine],
        boundaries=[tc.warmup_steps, tc.warmup_steps + hold],
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norm scales or sink logits (biases are not Params)."""

    def decays(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in ("scale", "sinks")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(model: MiMoV2Flash, tc: ml_collections.ConfigDict) -> nnx.Optimizer:
    """AdamW (b1, b2, eps, weight decay off norms/sinks) after global-norm clipping."""
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(
            learning_rate_schedule(tc),
            b1=tc.b1,
            b2=tc.b2,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            mask=_decay_mask,
        ),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def update_expert_bias(model: MiMoV2Flash, expert_load: jax.Array, rate: float) -> None:
    """Aux-loss-free balancing: bias += rate * sign(mean load - load), per MoE layer.

    Args:
      model: updated in place (the router ``ExpertBias`` variables; never the gradients).
      expert_load: [L, E] assignments per expert in the step's batch.
      rate: update rate (1e-3 in the technical report's pre-training, section 3).
    """
    for i, kind in enumerate(model.cfg.mlp_layer_types):
        if kind != SPARSE:
            continue
        layer, r = model.layer(i)
        load = expert_load[i]
        delta = rate * jnp.sign(jnp.mean(load) - load)  # [E]
        bias = layer.mlp.router.bias
        bias.set_value(bias[...] + delta if r is None else bias[...].at[r].add(delta))


# ---------------------------------------------------------------------------------------------
# Steps.


def _pretraining_loss(cfg: ModelConfig, tc: ml_collections.ConfigDict) -> Callable:
    """The default ``loss_fn`` of ``make_train_step``: ``model_loss`` on tokens [B, T + 1]."""

    def loss_fn(model, tokens):
        loss, metrics, out = model_loss(
            model, tokens, mtp_weight=tc.mtp_loss_weight, aux_weight=tc.aux_loss_weight,
            chunk=tc.loss_chunk,
        )  # fmt: skip
        metrics["dropped_fraction"] = mean_dropped_fraction(cfg, out.aux)
        metrics["loss"] = loss  # the optimised total: ce + MTP and balance terms
        return loss, (metrics, out.aux["expert_load"])

    return loss_fn


def mean_dropped_fraction(cfg: ModelConfig, aux: dict[str, jax.Array]) -> jax.Array:
    """Share of expert assignments an expert_parallel capacity dropped, mean over MoE layers."""
    n_moe = max(1, sum(k == SPARSE for k in cfg.mlp_layer_types))
    return jnp.sum(aux["dropped_fraction"]) / n_moe


def make_train_step(
    graphdef,
    cfg: ModelConfig,
    tc: ml_collections.ConfigDict,
    shardings=None,
    loss_fn: Callable | None = None,
):
    """A jitted ``(state, batch) -> (state, metrics)`` over A accumulation steps.

    Args:
      graphdef: graph definition of ``(model, optimizer)``.
      cfg: model config.
      tc: optimizer and balancing fields (``config.train``, or ``config.rl``): the schedule's,
        ``bias_update_rate`` and, for the default loss, ``mtp_loss_weight``,
        ``aux_loss_weight`` and ``loss_chunk``.
      shardings: optional NamedShardings of the ``(model, optimizer)`` state (from
        ``sharding.state_shardings``, under ``use_mesh``): the state keeps exactly this layout
        from step to step. The batch keeps the sharding it comes with (``sharding.put_batch``
        along its batch dim, 1).
      loss_fn: ``loss_fn(model, micro_batch) -> (loss, (metrics, expert_load [L, E]))``; by
        default the pre-training loss of tokens ``[A, B, T + 1]``. The batch is any pytree
        whose leaves are ``[A, ...]``; each accumulation step gets one slice.
    """
    schedule = learning_rate_schedule(tc)
    loss_fn = loss_fn or _pretraining_loss(cfg, tc)

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        # Gradients of a pure function of the params: NNX objects must not cross into the scan.
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def pure_loss(params, batch):
            return loss_fn(nnx.merge(model_def, params, rest), batch)

        grad_fn = jax.value_and_grad(pure_loss, has_aux=True)

        def micro(carry, batch):
            (_, (metrics, load)), grads = grad_fn(params, batch)
            return jax.tree.map(jnp.add, carry, (grads, metrics, load)), None

        first = jax.tree.map(lambda x: x[0], batch)
        (_, (metrics0, load0)), grads0 = jax.eval_shape(grad_fn, params, first)
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads0, metrics0, load0))
        (grads, metrics, load), _ = jax.lax.scan(micro, zero, batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = jax.tree.map(lambda m: m / n, metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["num_zeros"] = sum(jnp.sum(g == 0) for g in jax.tree.leaves(grads))
        metrics["lr"] = schedule(opt.step[...])
        opt.update(model, grads)
        update_expert_bias(model, load, tc.bias_update_rate)
        moe = jnp.array([k == SPARSE for k in cfg.mlp_layer_types])
        imbalance = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)  # [L]
        metrics["load_max_over_mean"] = jnp.sum(jnp.where(moe, imbalance, 0)) / jnp.maximum(
            jnp.sum(moe), 1
        )
        return nnx.state((model, opt)), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(
        step, donate_argnums=0, in_shardings=(shardings, None), out_shardings=(shardings, None)
    )


def make_eval_step(graphdef, loss_chunk: int = 0):
    """A jitted ``(model state, tokens [B, T + 1]) -> {ce, mtp_ce_k}`` (unweighted).

    Args:
      graphdef: graph definition of the model.
      loss_chunk: ``config.train.loss_chunk`` (see ``model_loss``).
    """

    def step(state, tokens):
        model = nnx.merge(graphdef, state)
        _, metrics, _ = model_loss(model, tokens, mtp_weight=0.0, aux_weight=0.0, chunk=loss_chunk)
        return metrics

    return jax.jit(step)


def _check_eval_batches(tc: ml_collections.ConfigDict) -> None:
    if tc.eval_batches < 0:
        raise ValueError(
            f"config.train.eval_batches={tc.eval_batches} must be >= 0 (0 = every window)"
        )


def evaluate(
    model: MiMoV2Flash,
    val_tokens: np.ndarray,
    ec,
    bytes_per_token: float,
    eval_step: Callable | None = None,
    keep_progress: bool = False,
) -> dict:
    """Validation loss and bits per byte over fixed windows spread over the split.

    The windows are ``data.eval_batches``: ``ec.eval_batches`` batches of ``ec.batch_size``
    windows of ``ec.seq_len``, spread evenly over the split; 0 takes every window.

    Args:
      model: the model.
      val_tokens: int [N] validation tokens.
      ec: ``config.train`` (batch_size, seq_len, eval_batches, loss_chunk).
      bytes_per_token: mean UTF-8 bytes per token, for bits per byte.
      eval_step: ``make_eval_step(nnx.graphdef(model), ec.loss_chunk)``, built once by a loop
        that evaluates repeatedly (a new one compiles again); None builds one.
      keep_progress: print the final ``eval batch n/n`` line (else the batch count is only
        shown on a terminal while it runs).

    Returns:
      ``val_loss`` (nats/token), ``val_bpb`` (= val_loss / ln 2 / bytes_per_token), per-depth
      ``val_mtp_ce_<k>``.

    Raises:
      ValueError: ``ec.eval_batches`` < 0, or the split holds fewer than one batch of windows
        (raised by ``data.eval_batches``).
    """
    _check_eval_batches(ec)
    graphdef, state = nnx.split(model)
    step = eval_step or make_eval_step(graphdef, ec.loss_chunk)
    sums, n = {}, 0
    window = dict(batch_size=ec.batch_size, seq_len=ec.seq_len, max_batches=ec.eval_batches or None)
    total = data.num_eval_batches(val_tokens, **window)
    progress = Progress("eval batch", total, keep=keep_progress)
    for batch in data.eval_batches(val_tokens, **window):
        m = step(state, sh.put_batch(batch))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
        n += 1
        progress.update(n)
    progress.close()
    out = {f"val_{k}": v / n for k, v in sums.items() if k != "aux_loss"}
    out["val_loss"] = out.pop("val_ce")
    out["val_bpb"] = out["val_loss"] / math.log(2) / bytes_per_token
    return out


# ---------------------------------------------------------------------------------------------
# Loop.


class MetricsWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard event files under the workdir."""

    def __init__(self, workdir: str):
        # Multi-host: every process computes the same metrics; process 0 alone writes them.
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional heavy import)

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run; ``dtype="auto"`` means bf16 on accelerators, fp32 on CPU."""
    d = config.model.to_dict()
    if d.get("dtype") == "auto":
        d["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return from_config_dict(d)


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--workdir {workdir!r} is not writable: {e}") from e


def architecture_diff(saved: ModelConfig, cfg: ModelConfig) -> list[str]:
    """The ModelConfig fields in which two configs differ, except those a checkpoint's weights do
    not depend on (compute dtype, attention and MoE implementations, remat)."""
    structural = {"dtype", "attention_impl", "moe_impl", "moe_capacity_factor", "remat"}
    return [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in structural and getattr(saved, f.name) != getattr(cfg, f.name)
    ]


def check_tokenizer_fits(cfg: ModelConfig, tokenizer) -> None:
    """Refuses a tokenizer with more ids than ``config.model.vocab_size``."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={cfg.vocab_size} < tokenizer vocab {tokenizer.vocab_size}"
        )


def check_batch_shards(config: ml_collections.ConfigDict, mesh) -> None:
    """Refuses a ``config.train.batch_size`` that the mesh's batch shards do not divide."""
    shards = math.prod(mesh.shape[a] for a in ax.mesh_axes(ax.BATCH))
    if config.train.batch_size % shards:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} must be divisible by the batch "
            f"shards of config.mesh.shape={tuple(config.mesh.shape)} with rules "
            f"{config.mesh.rules!r} ({ax.mesh_axes(ax.BATCH)}: {shards} shards)"
        )


def _check_same_model(workdir: str, cfg: ModelConfig) -> None:
    """Refuses to resume a workdir whose checkpoints belong to another architecture."""
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return
    diff = architecture_diff(checkpoint.load_model_config(workdir), cfg)
    if diff:
        raise ValueError(
            f"{workdir} holds a run of a different model (fields {diff} differ from "
            f"{checkpoint.CONFIG_FILE}); use a new --workdir"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from the latest checkpoint in ``workdir``), evaluates, prints a sample.

    Args:
      config: ml_collections config (see ``configs/``).
      workdir: run directory for checkpoints, metrics and the model config.

    Returns:
      The last logged metrics (train and validation).
    """
    tc = config.train
    cfg = model_config(config)
    # Bad train settings fail here, before the workdir is created or the data loaded.
    learning_rate_schedule(tc)
    _check_eval_batches(tc)
    _check_workdir(workdir)
    _check_same_model(workdir, cfg)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    check_tokenizer_fits(cfg, tokenizer)
    splits = data.load_tokens(config.data)
    bpt = data.bytes_per_token(splits.validation[:100_000], tokenizer)
    mesh = sh.make_mesh(config.mesh.shape)
    with sh.use_mesh(mesh, config.mesh.rules):
        check_batch_shards(config, mesh)
        return _train(config, workdir, cfg, tokenizer, splits, bpt)


def _train(config, workdir, cfg, tokenizer, splits, bpt) -> dict[str, float]:
    """The training loop of ``train_and_evaluate``, under the run's mesh and rules."""
    tc = config.train
    # Model and optimizer state are created already sharded (never whole on one device).
    model, opt = sh.create_sharded(
        lambda: (m := MiMoV2Flash(cfg, rngs=nnx.Rngs(config.seed)), make_optimizer(m, tc))
    )
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        start = ckpt.restore(model, opt)
    elif jax.process_index() == 0:
        checkpoint.save_model_config(workdir, cfg)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logging.info("layer plan %s", model.plan)
    progress = Progress("step", tc.steps, start=start, every_s=math.inf)
    progress.say(
        f"{n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, {jax.device_count()} "
        f"{jax.default_backend()} device(s); {workdir}: "
        + (f"resuming at step {start}" if start else "new run")
        + f"; metrics every {tc.log_every} steps in metrics.jsonl"
    )

    eval_step = make_eval_step(nnx.graphdef(model), tc.loss_chunk)

    def batch_of(step):  # [A, B, T + 1]
        return np.stack(
            [
                data.get_batch(
                    splits.train,
                    batch_size=tc.batch_size,
                    seq_len=tc.seq_len,
                    seed=config.seed,
                    step=step * tc.grad_accum + a,
                )
                for a in range(tc.grad_accum)
            ]
        )

    last = run_loop(
        model, opt, cfg, tc, workdir=workdir, ckpt=ckpt, progress=progress, start=start,
        batch_of=batch_of, eval_fn=lambda: evaluate(model, splits.validation, tc, bpt, eval_step),
    )  # fmt: skip
    if tc.sample_len:
        prompt = tokenizer.encode(tc.sample_prompt)
        text = tokenizer.decode(sample(model, prompt, tc.sample_len, temperature=0.8, seed=0))
        print(f"--- sample ---\n{tc.sample_prompt}{text}\n--------------", flush=True)
    return last


def run_loop(
    model: MiMoV2Flash,
    opt: nnx.Optimizer,
    cfg: ModelConfig,
    tc: ml_collections.ConfigDict,
    *,
    workdir: str,
    ckpt: checkpoint.Checkpointer,
    progress: Progress,
    start: int,
    batch_of: Callable[[int], Any],
    eval_fn: Callable[[], dict[str, float]],
    loss_fn: Callable | None = None,
) -> dict[str, float]:
    """Steps ``start`` .. ``tc.steps`` of a run: the loop of pre-training and SFT.

    Metrics (the train step's, ``tokens_per_sec`` and, every ``tc.eval_every`` steps and at the
    end, ``eval_fn``'s) every ``tc.log_every`` steps and at the end, to stdout and
    ``MetricsWriter``; checkpoints every ``tc.checkpoint_every`` steps and at the end. Throughput
    counts neither the first step's compilation nor evaluation nor checkpointing.

    Args:
      model, opt: the run's state (restored or initialised); updated in place, ``ckpt`` closed.
      cfg: the model config.
      tc: ``config.train`` (the schedule, loop and balancing fields; ``batch_size``,
        ``seq_len`` and ``grad_accum`` give the tokens per step).
      workdir: where ``metrics.jsonl`` and the TensorBoard events go.
      ckpt: the run's Checkpointer.
      progress: the run's progress printer (counting steps from ``start``).
      start: the first step to run.
      batch_of: step -> host batch, a pytree of [A, ...] arrays (a pure function of the step,
        so a resumed run sees the same batches).
      eval_fn: evaluation metrics of ``model`` (called with the model up to date).
      loss_fn: ``make_train_step``'s (default: the pre-training loss).

    Returns:
      The last logged metrics.
    """
    graphdef, state = nnx.split((model, opt))
    train_step = make_train_step(graphdef, cfg, tc, sh.state_shardings((model, opt)), loss_fn)
    writer = MetricsWriter(workdir)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    last: dict[str, float] = {}
    t0, window_steps = time.perf_counter(), 0
    if start < tc.steps:
        progress.say(f"compiling the train step (step {start + 1} takes longer)")
    for step in range(start, tc.steps):
        batch = jax.tree.map(lambda x: sh.put_batch(x, batch_dim=1), batch_of(step))
        state, metrics = train_step(state, batch)
        window_steps += 1
        done = step + 1
        log = done % tc.log_every == 0 or done == tc.steps
        if step == start:
            # The first step compiles: throughput (and the ETA) count from its end.
            jax.block_until_ready(metrics)
            compiled = time.perf_counter()
            progress.say(f"step {done} ran in {format_seconds(compiled - t0)} (compiling)")
            if not log:
                t0, window_steps = compiled, 0
        if log:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            metrics["tokens_per_sec"] = window_steps * tokens_per_step / dt
            t0, window_steps = time.perf_counter(), 0
            if done % tc.eval_every == 0 or done == tc.steps:
                nnx.update((model, opt), state)
                metrics.update(eval_fn())
                t0 = time.perf_counter()  # evaluation time is not training throughput
            writer.write(done, metrics)
            last = metrics
            progress.update(done, _progress_fields(metrics), force=True)
        else:
            progress.update(done)
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            t_save = time.perf_counter()
            nnx.update((model, opt), state)
            ckpt.save(done, model, opt)
            t0 += time.perf_counter() - t_save  # nor is checkpointing time
    nnx.update((model, opt), state)
    ckpt.close()
    writer.close()
    progress.say(f"step {tc.steps} reached; checkpoints in {ckpt.directory}")
    return last


# Held-out success rates a progress line shows when an evaluation logged them (greedy; sampled).
HELDOUT_RATES = ("heldout_success", "heldout_sampled_success")


def _progress_fields(m: dict[str, float]) -> str:
    """The metrics of a progress line, named as in metrics.jsonl (``mtp_ce`` lists each depth's
    ``mtp_ce_<k>``)."""
    mtp = "/".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("mtp_ce_"))
    fields = [f"loss {m['loss']:.4f}", f"ce {m['ce']:.4f}"]
    if mtp:
        fields.append(f"mtp_ce {mtp}")
    fields += [
        f"grad_norm {m['grad_norm']:.3f}",
        f"lr {m['lr']:.2e}",
        f"load_max_over_mean {m['load_max_over_mean']:.2f}",
        f"tokens_per_sec {m['tokens_per_sec']:.0f}",
    ]
    if "val_loss" in m:
        fields += [f"val_loss {m['val_loss']:.4f}", f"val_bpb {m['val_bpb']:.3f}"]
    for k in HELDOUT_RATES:
        if k in m:
            fields.append(f"{k} {m[k]:.3f}")
    return " | ".join(fields)


def sample(model: MiMoV2Flash, prompt: np.ndarray, n: int, *, temperature: float, seed: int):
    """Samples ``n`` tokens after ``prompt`` with ``mimo_jax.generate`` (plain decoding).

    Args:
      model: the model.
      prompt: int [T0] prompt tokens (non-empty).
      n: tokens to generate.
      temperature: softmax temperature; 0 is greedy.
      seed: sampling seed.

    Returns:
      int32 [n] new tokens.
    """
    ids = np.asarray(prompt, np.int32)[None]  # [1, T0]
    res = generate(model, ids, max_new_tokens=n, temperature=temperature, seed=seed)
    return np.asarray(res.tokens[0, ids.shape[1] :], np.int32)


def eval_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Validation loss and bits per byte of the latest checkpoint in ``workdir``."""
    model = checkpoint.load_model(workdir, dtype=model_config(config).dtype)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    splits = data.load_tokens(config.data)
    return evaluate(
        model, splits.validation, config.train,
        data.bytes_per_token(splits.validation[:100_000], tokenizer), keep_progress=True,
    )  # fmt: skip
