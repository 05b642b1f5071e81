"""On-policy RL with verifiable rewards (GRPO / Dr.GRPO) and rollout routing replay (R3).

``run(config, workdir)`` is ``main.py --mode=rl``. Each step:

1. samples G responses to each of P training prompts of ``config.task`` from the policy, cast to
   ``config.rl.rollout_dtype`` as an inference engine would serve it, recording each token's
   log-probability and the experts it used;
2. scores them with the task's verifier (``tasks.checked_reward``: a raising or non-finite
   reward stops the run naming the task and prompt) and computes group advantages;
3. takes ``updates_per_step`` optimizer steps on the clipped surrogate (``rl_step``), replaying
   the rollout's experts in every training forward (``config.rl.routing_replay``).

The prompts and the sampling seed of step s are pure functions of (seed, s): a run resumed from a
checkpoint follows the uninterrupted run's curve. Without ``config.init_from`` the run first does
the SFT warm-up (``sft.run``) in ``<workdir>/sft`` and starts from its last checkpoint.
docs/post_training.md describes the metrics.
"""

import math
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from mimo_jax import axes as ax
from mimo_jax import checkpoint, data
from mimo_jax import sharding as sh
from mimo_jax.config import ModelConfig
from mimo_jax.post_training import losses, policy, rl_step, rollout, sft, tasks
from mimo_jax.post_training.agent import episodes
from mimo_jax.progress import Progress
from mimo_jax.sampling import Sampling
from mimo_jax.train import (
    HELDOUT_RATES,
    MetricsWriter,
    _check_same_model,
    _check_workdir,
    make_optimizer,
    make_train_step,
    model_config,
)

_PROMPT_STREAM, _SAMPLE_STREAM = 0, 1


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 31-bit seed that is a pure function of (run seed, step, stream)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0] >> 1)


def check_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Raises ValueError naming the first bad ``config.rl`` field."""
    rc = config.rl

    def need(ok: bool, field: str, expected: str):
        if not ok:
            raise ValueError(f"config.rl.{field}={rc[field]!r}: {expected}")

    need(rc.steps >= 1, "steps", "must be >= 1")
    need(rc.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    need(rc.group_size >= 2, "group_size", "must be >= 2 (the group mean is the baseline)")
    need(rc.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    need(rc.temperature > 0, "temperature", "must be > 0 (on-policy RL samples)")
    need(rc.advantage in rl_step.ADVANTAGES, "advantage", f"must be one of {rl_step.ADVANTAGES}")
    need(rc.aggregation in losses.AGGREGATIONS, "aggregation", f"one of {losses.AGGREGATIONS}")
    need(rc.rollout_dtype in rollout.ROLLOUT_DTYPES, "rollout_dtype", str(rollout.ROLLOUT_DTYPES))
    need(0 <= rc.eps_low < 1, "eps_low", "must be in [0, 1)")
    need(rc.eps_high >= 0, "eps_high", "must be >= 0")
    need(rc.dual_clip_c == 0 or rc.dual_clip_c > 1, "dual_clip_c", "must be 0 (off) or > 1")
    need(0 < rc.iw_low <= 1 <= rc.iw_high, "iw_low", "need 0 < iw_low <= 1 <= iw_high")
    need(rc.kl_weight >= 0, "kl_weight", "must be >= 0")
    need(rc.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
    need(
        0 <= rc.num_draft_tokens <= cfg.num_mtp_layers,
        "num_draft_tokens",
        f"must be in 0..{cfg.num_mtp_layers} (config.model.num_mtp_layers)",
    )
    batch = rc.prompts_per_step * rc.group_size
    need(
        rc.updates_per_step >= 1 and batch % rc.updates_per_step == 0,
        "updates_per_step",
        f"must be >= 1 and divide prompts_per_step * group_size = {batch}",
    )
    shards = math.prod(jax.sharding.get_mesh().shape.get(a, 1) for a in ax.mesh_axes(ax.BATCH))
    need(
        (batch // rc.updates_per_step) % shards == 0,
        "updates_per_step",
        f"each update's {batch // rc.updates_per_step} sequences must divide over the "
        f"{shards} batch shards of config.mesh",
    )
    for field in ("log_every", "heldout_every", "checkpoint_every", "heldout_prompts"):
        need(rc[field] >= 1, field, "must be >= 1")


def _optimizer_fields(rc: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.rl`` with ``steps`` counted in optimizer updates (the schedule's unit)."""
    oc = ml_collections.ConfigDict(rc.to_dict())
    oc.steps = rc.steps * rc.updates_per_step
    return oc


def run(
    config: ml_collections.ConfigDict, workdir: str, *, teachers_from: Callable | None = None
) -> dict[str, float]:
    """On-policy RL from ``config.init_from`` (or the SFT warm-up), resuming from ``workdir``.

    Args:
      config: ml_collections config with ``task`` (or ``domains``: a mixture of tasks), ``rl``
        (and ``train`` / ``sft`` for the warm-up); see configs/rl_tiny.py.
      workdir: run directory: ``model_config.json``, checkpoints, ``metrics.jsonl`` (and
        ``sft/`` for the warm-up).
      teachers_from: MOPD (``mopd.run``): ``teachers_from(mixture, tokenizer, init_from)``
        returns the domain teachers whose log-probs replace the GRPO objective by the MOPD one
        (``rl_step.make_loss_fn``).

    Returns:
      The last logged metrics.
    """
    cfg = model_config(config)
    agent = episodes.is_agent(config)
    if agent:
        episodes.check_config(config)
        if teachers_from is not None:
            raise ValueError('--mode=mopd does not take config.task.name="agent" (agent runs '
                             "use --mode=rl)")  # fmt: skip
    mixture = None if agent else policy.mixture_from_config(config)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    mesh = sh.make_mesh(config.mesh.shape)
    with sh.use_mesh(mesh, config.mesh.rules):
        check_config(config, cfg)
    _check_workdir(workdir)
    _check_same_model(workdir, cfg)
    blind = [] if agent else [d for d in mixture.domains if not mixture.task(d).verifiable]
    if blind and teachers_from is None:
        raise ValueError(
            f"config.domains {blind} have no verifier (prompt files): RL needs rewards; "
            "distil them with --mode=mopd"
        )
    init_from = config.init_from
    warm: dict[str, float] = {}
    if not init_from:
        init_from = os.path.join(workdir, "sft")
        print(f"SFT warm-up in {init_from} (config.init_from is empty)", flush=True)
        warm = sft.run(config, init_from)
    # An agent warm-up ends with the held-out episodes RL starts from (same weights, same
    # greedy episodes): its score is step 0's. Other tasks' warm-ups use sft.heldout_prompts.
    step0 = {k: v for k, v in warm.items() if k.startswith("heldout_")} if agent else {}
    with sh.use_mesh(mesh, config.mesh.rules):
        teachers = teachers_from and teachers_from(mixture, tokenizer, init_from)
        return _rl(config, workdir, cfg, mixture, tokenizer, init_from, teachers, step0)


class _Timer:
    """Accumulates wall seconds per phase; ``read()`` returns and resets them."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, name: str, t0: float) -> None:
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        out, self.s = self.s, {}
        return out


def _sample(roll, mixture, tokenizer, rc, seed: int, step: int):
    """Step ``step``'s rollouts: G samples of each of P prompts, all a function of (seed, step).

    Returns:
      (Rollouts, the domain of each row): rows grouped by prompt, prompts by domain.
    """
    pairs = mixture.train_prompts(step_seed(seed, step, _PROMPT_STREAM), rc.prompts_per_step)
    domains = [d for d, _ in pairs for _ in range(rc.group_size)]
    ro = rollout.sample(
        roll, tokenizer, [p for _, p in pairs for _ in range(rc.group_size)],
        prompt_len=rollout.PROMPT_LEN, max_new_tokens=rc.max_new_tokens,
        temperature=rc.temperature, top_k=rc.top_k, seed=step_seed(seed, step, _SAMPLE_STREAM),
        num_draft_tokens=rc.num_draft_tokens,
    )  # fmt: skip
    return ro, domains


def score(
    source: tasks.Task | tasks.Mixture, ro: rollout.Rollouts, domains: list[str] | None = None
) -> np.ndarray:
    """float32 [B] verifier rewards.

    Args:
      source: the task of every row, or a mixture whose task for each row is its domain's.
      ro: the rollouts.
      domains: each row's domain (with a mixture).

    Returns:
      The rewards. A task that raises or returns a non-finite value stops the run with a
      ValueError naming the task and the prompt (``tasks.checked_reward``).
    """
    if isinstance(source, tasks.Task):
        row_tasks = [source] * len(ro.prompts)
    else:
        row_tasks = [source.task(d) for d in domains]
    rows = zip(row_tasks, ro.prompts, ro.completions, strict=True)
    return np.array([tasks.checked_reward(t, p, c) for t, p, c in rows], np.float32)


def _per_domain(name: str, values: np.ndarray, domains: list[str], mixture) -> dict[str, float]:
    """``<name>_<domain>`` means of per-row ``values`` [B], for a mixture of several domains."""
    if len(mixture.domains) < 2:
        return {}
    rows = np.array(domains)
    return {f"{name}_{d}": float(values[rows == d].mean()) for d in mixture.domains}


def _rl(config, workdir, cfg, mixture, tokenizer, init_from, teachers, step0) -> dict[str, float]:
    """The loop of ``run``, under the run's mesh; ``step0``: the start's held-out metrics when
    already measured (else measured here)."""
    rc = config.rl
    model = policy.init_model(config, cfg, init_from=init_from)
    opt = make_optimizer(model, _optimizer_fields(rc))
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=rc.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        start = ckpt.restore(model, opt)
    elif jax.process_index() == 0:
        checkpoint.save_model_config(workdir, cfg)
    ref = policy.init_model(config, cfg, init_from=init_from) if rc.kl_weight else None
    roll = rollout.rollout_model(model, rc.rollout_dtype)
    sampling = Sampling(float(rc.temperature), int(rc.top_k), 1.0)
    graphdef, state = nnx.split((model, opt))
    # MOPD on several domains: per-domain masked shares need each row's domain index.
    per_domain = tuple(mixture.domains) if teachers and len(mixture.domains) > 1 else ()
    train_step = make_train_step(
        graphdef, cfg, _optimizer_fields(rc), sh.state_shardings((model, opt)),
        loss_fn=rl_step.make_loss_fn(cfg, rc, sampling, config.get("mopd") if teachers else None,
                                     domains=per_domain),
    )  # fmt: skip
    logp_fn = rl_step.make_logp_fn(sampling, rc.routing_replay)
    probe = rl_step.make_r3_probe(cfg, sampling)
    writer = MetricsWriter(workdir)
    progress = Progress("rl step", rc.steps, start=start, every_s=math.inf)
    objective = "MOPD" if teachers else "RL"
    agent = episodes.AgentSource(config, tokenizer) if mixture is None else None
    progress.say(
        f"{objective} on {'agent tasks' if agent else '+'.join(mixture.domains)} "
        f"from {init_from}: "
        f"{rc.prompts_per_step} prompts x "
        f"{rc.group_size} samples per step, {rc.rollout_dtype} rollouts, routing replay "
        f"{'on' if rc.routing_replay else 'off'}; {workdir}: "
        + (f"resuming at step {start}" if start else "new run")
    )

    def heldout(model) -> dict[str, float]:
        if agent is not None:
            return agent.heldout(model)
        return rollout.heldout_metrics(model, mixture, tokenizer, num_prompts=rc.heldout_prompts)

    last: dict[str, float] = {}
    if start == 0:
        last = step0 or heldout(model)
        writer.write(0, last)
        if last:
            source = " (the warm-up's last evaluation)" if step0 else ""
            rates = " | ".join(f"{k} {last[k]:.3f}" for k in HELDOUT_RATES if k in last)
            progress.say(f"step 0: {rates}{source}")
    timer, generated = _Timer(), 0.0
    for step in range(start, rc.steps):
        done = step + 1
        log = done % rc.log_every == 0 or done % rc.heldout_every == 0 or done == rc.steps
        nnx.update((model, opt), state)
        t0 = time.perf_counter()
        rollout.sync_rollout_model(roll, model)
        if agent is not None:  # episodes are scored as they end
            seeds = (step_seed(config.seed, step, s) for s in (_PROMPT_STREAM, _SAMPLE_STREAM))
            sampled = agent.sample(roll, *seeds)
            host_batch, rewards, domains = sampled.batch, sampled.rewards, None
            stats = {"response_length": sampled.stats["model_tokens"], "mean_accepted_length": 1.0,
                     **sampled.stats}  # fmt: skip
            timer.add("rollout_s", t0)
            t0 = time.perf_counter()
        else:
            ro, domains = _sample(roll, mixture, tokenizer, rc, config.seed, step)
            timer.add("rollout_s", t0)
            t0 = time.perf_counter()
            rewards = score(mixture, ro, domains)
            host_batch = rl_step.build_batch(ro, rewards, rc)
            stats = {"response_length": float(ro.response_mask.sum(axis=1).mean()),
                     "mean_accepted_length": ro.mean_accepted_length}  # fmt: skip
        generated += float(host_batch["mask"].sum())
        if teachers:
            t1 = time.perf_counter()
            host_batch["teacher_logp"] = teachers.logp(host_batch, domains)
            if per_domain:
                host_batch["domain"] = np.array([per_domain.index(d) for d in domains], np.int32)
            timer.add("teacher_s", t1)
        batch = {k: sh.put_batch(v) for k, v in host_batch.items()}
        if ref is not None:
            host_batch["ref_logp"] = np.asarray(logp_fn(ref, batch))
        if rc.updates_per_step > 1:
            host_batch["old_logp"] = np.asarray(logp_fn(model, batch))
        probed = probe(model, batch) if log and "routing" in batch else {}
        n = rc.updates_per_step
        per = len(host_batch["tokens"]) // n
        step_metrics = []
        for u in range(n):
            rows = slice(u * per, (u + 1) * per)
            micro = {k: sh.put_batch(v[rows][None], batch_dim=1) for k, v in host_batch.items()}
            state, m = train_step(state, micro)
            step_metrics.append(m)
        jax.block_until_ready(state)  # dispatch is asynchronous: time the updates themselves
        timer.add("train_s", t0)
        if log:
            m = jax.device_get(step_metrics)
            metrics = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
            metrics.update({k: float(v) for k, v in jax.device_get(probed).items()})
            groups = rewards.reshape(rc.prompts_per_step, rc.group_size)
            metrics.update(
                reward_mean=float(rewards.mean()),
                reward_std=float(rewards.std()),
                train_success=float(np.mean(rewards == 1.0)),
                tied_group_share=float(np.mean(groups.min(axis=1) == groups.max(axis=1))),
                **stats,
                rollout_tokens_per_sec=generated / max(timer.s["rollout_s"], 1e-9),
            )
            generated = 0.0
            if mixture is not None:
                metrics.update(_per_domain("reward", rewards, domains, mixture))
            if teachers:
                kl = teachers.reverse_kl(host_batch)  # [B] per row
                metrics["reverse_kl"] = float(np.mean(kl))
                metrics.update(_per_domain("reverse_kl", kl, domains, mixture))
            times = timer.read()
            metrics.update(times)
            if teachers:
                metrics["teacher_share"] = times["teacher_s"] / (
                    times["rollout_s"] + times["train_s"]
                )
            if done % rc.heldout_every == 0 or done == rc.steps:
                nnx.update((model, opt), state)
                metrics.update(heldout(model))
            writer.write(done, metrics)
            last = metrics
            progress.update(done, _fields(metrics), force=True)
        else:
            progress.update(done)
        if done % rc.checkpoint_every == 0 or done == rc.steps:
            nnx.update((model, opt), state)
            ckpt.save(done, model, opt)
    nnx.update((model, opt), state)
    ckpt.close()
    writer.close()
    progress.say(f"rl step {rc.steps} reached; checkpoints in {ckpt.directory}")
    return last


def _fields(m: dict[str, float]) -> str:
    """The progress line's metrics, named as in metrics.jsonl."""
    names = ["reward_mean", *HELDOUT_RATES, "response_length", "entropy", "clip_frac_high",
             "rollout_s", "train_s"]  # fmt: skip
    small = ["r3_kl_replay", "r3_kl_no_replay"]  # bf16 vs fp32 gaps: ~1e-4 and below
    return " | ".join(
        [f"{k} {m[k]:.3f}" for k in names if k in m] + [f"{k} {m[k]:.1e}" for k in small if k in m]
    )
