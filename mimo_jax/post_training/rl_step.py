"""The training side of an RL step: rollout batch, policy log-probs with routing replay, loss.

A batch holds, per sampled sequence, what ``rollout.sample`` recorded and the reward side added:
every array is ``[B, ...]`` with B = P prompts x G samples, laid out for the model's inputs
(``tokens[:, :-1]``) and labels (``tokens[:, 1:]``), so position t scores token t + 1:

  ``tokens``         int32   [B, S]           prompt, response, padding
  ``mask``           float32 [B, S - 1]       1 where label t + 1 is a sampled response token
  ``advantages``     float32 [B]              group-normalised (GRPO) or centred (Dr.GRPO)
  ``rollout_logp``   float32 [B, S - 1]       the rollout engine's log-prob of label t + 1
  ``routing``        int32   [B, L, S - 1, k] the rollout's experts at input position t
  ``old_logp``       float32 [B, S - 1]       (several updates per batch) the policy before them
  ``ref_logp``       float32 [B, S - 1]       (KL to a reference) the frozen reference's

Routing is batch-major ([B, L, ...], not the model's [L, B, ...]) so that every leaf shards on
its first dimension (``sharding.put_batch``); ``replayed`` transposes it back.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mimo_jax.config import SPARSE, ModelConfig
from mimo_jax.loss import cross_entropy
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import losses, r3
from mimo_jax.post_training.rollout import Rollouts
from mimo_jax.sampling import Sampling, token_logprobs
from mimo_jax.train import mean_dropped_fraction

ADVANTAGES = ("grpo", "drgrpo")


def build_batch(ro: Rollouts, rewards: np.ndarray, rc: ml_collections.ConfigDict) -> dict:
    """The training batch of one rollout round.

    Args:
      ro: rollouts of P prompts x G samples (the G samples of a prompt adjacent).
      rewards: float [B] verifier rewards.
      rc: ``config.rl`` (``group_size``, ``advantage``).

    Returns:
      dict of NumPy arrays (module docstring); ``routing`` only when recorded.
    """
    adv = losses.group_advantages(
        jnp.asarray(rewards, jnp.float32),
        group_size=rc.group_size,
        normalize_std=rc.advantage == "grpo",
    )
    batch = {
        "tokens": ro.tokens,
        "mask": ro.response_mask[:, 1:],
        "advantages": np.asarray(adv),
        "rollout_logp": ro.logprobs[:, 1:],
    }
    if ro.routing is not None:
        batch["routing"] = np.ascontiguousarray(np.moveaxis(ro.routing[:, :, :-1], 0, 1))
    return batch


def replayed(batch: dict, replay: bool) -> jax.Array | None:
    """The batch's routing in the model's layout [L, B, S - 1, k], or None without replay."""
    if not replay:
        return None
    return jnp.moveaxis(batch["routing"], 0, 1)


def policy_forward(
    model: MiMoV2Flash, batch: dict, sampling: Sampling, *, replay: bool, mtp: bool = False
):
    """The policy's log-probs of the batch's labels, as the rollout drew them.

    Args:
      model: the policy (or the frozen reference).
      batch: a rollout batch (or one micro-batch of it).
      sampling: the rollout's temperature / top-k: log-probs are of the distribution the tokens
        were sampled from (``sampling.token_logprobs``).
      replay: replay the rollout's experts (R3) instead of routing afresh.
      mtp: also run the MTP chain (detached from the trunk, embedding and head).

    Returns:
      (logp fp32 [B, S - 1], logits fp32 [B, S - 1, V], model output).
    """
    tokens = batch["tokens"]
    # The MTP chain sees the trunk detached: its loss on the policy's own samples trains the
    # draft layers and leaves the policy to the policy-gradient terms.
    out = model(tokens[:, :-1], routing=replayed(batch, replay), mtp=mtp, mtp_detached=True)
    logp = token_logprobs(out.logits, tokens[:, 1:], sampling)
    return logp, out.logits, out


def _entropy(logits: jax.Array, sampling: Sampling, mask: jax.Array) -> jax.Array:
    """Mean entropy of the sampling distribution over response positions."""
    z = logits / (sampling.temperature or 1.0)
    logp = jax.nn.log_softmax(z, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, S - 1]
    return losses.masked_mean(ent, mask)


def _mtp_loss(out, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Mean over depths of the MTP CE on response labels: depth k at t predicts token t + k + 2,
    counted where that token is a response token of the same row."""
    labels = tokens[:, 1:]
    t = labels.shape[1]
    total, metrics = 0.0, {}
    for k, logits in enumerate(out.mtp_logits):
        shifted = jnp.roll(labels, -(k + 1), axis=1)
        valid = (jnp.arange(t) < t - (k + 1))[None]
        m = jnp.roll(mask, -(k + 1), axis=1) * valid
        metrics[f"mtp_ce_{k}"] = cross_entropy(logits, shifted, m)
        total = total + metrics[f"mtp_ce_{k}"]
    return total / max(len(out.mtp_logits), 1), metrics


def make_loss_fn(
    cfg: ModelConfig,
    rc: ml_collections.ConfigDict,
    sampling: Sampling,
    mopd: ml_collections.ConfigDict | None = None,
    domains: tuple[str, ...] = (),
):
    """The ``loss_fn(model, batch) -> (loss, (metrics, expert_load))`` of an RL or MOPD step.

    RL: loss = clipped surrogate (with the eq. 8 importance weights if
    ``rc.importance_weights``) + ``kl_weight`` * k3 KL to the reference. Without ``old_logp`` in
    the batch (one update per rollout batch) the old policy is the current one: the ratio is 1
    and its gradient is the policy gradient.
    MOPD (``mopd`` given): loss = ``losses.mopd_loss`` with the batch's ``teacher_logp``, the
    outcome advantages weighted by ``mopd.alpha`` and the weight bounds ``mopd.eps_low`` /
    ``mopd.eps_high``.
    Both add ``mtp_loss_weight`` * the MTP CE on the responses (detached from the trunk).

    Args:
      cfg: model config.
      rc: ``config.rl``.
      sampling: the rollout's sampling (temperature, top-k).
      mopd: ``config.mopd`` for the distillation objective; None for RL.
      domains: MOPD over several domains: their names, in the order of the batch's ``domain``
        row indices (int32 [B]); adds ``masked_share_<domain>`` per domain.
    """
    dual = rc.dual_clip_c or None
    want_mtp = bool(rc.mtp_loss_weight) and cfg.num_mtp_layers > 0

    def objective(logp, batch):
        mask = batch["mask"]
        if mopd is not None:
            loss, metrics = losses.mopd_loss(
                logp, batch["teacher_logp"], batch["rollout_logp"], mask,
                eps_low=mopd.eps_low, eps_high=mopd.eps_high, alpha=mopd.alpha,
                orm_advantages=batch["advantages"], baseline=mopd.get("baseline", False),
            )  # fmt: skip
            for k, name in enumerate(domains):  # eq. 8's dropped share over each domain's rows
                rows = (batch["domain"] == k).astype(mask.dtype)[:, None]  # [B, 1]
                metrics[f"masked_share_{name}"] = losses.importance_weights(
                    jax.lax.stop_gradient(logp), batch["rollout_logp"], mask * rows,
                    low=mopd.eps_low, high=mopd.eps_high,
                )[1]  # fmt: skip
            return loss, metrics
        old = batch.get("old_logp", jax.lax.stop_gradient(logp))
        weights, metrics = None, {}
        if rc.importance_weights:
            weights, metrics["iw_masked_share"] = losses.importance_weights(
                jax.lax.stop_gradient(logp), batch["rollout_logp"], mask,
                low=rc.iw_low, high=rc.iw_high,
            )  # fmt: skip
        pg, pg_metrics = losses.clipped_surrogate(
            logp, old, batch["advantages"], mask, eps_low=rc.eps_low, eps_high=rc.eps_high,
            dual_clip_c=dual, aggregation=rc.aggregation, token_weights=weights,
        )  # fmt: skip
        metrics.update(pg_metrics)
        if rc.kl_weight:
            metrics["kl_ref"] = losses.k3_kl(logp, batch["ref_logp"], mask, rc.aggregation)
            return pg + rc.kl_weight * metrics["kl_ref"], {**metrics, "pg_loss": pg}
        return pg, {**metrics, "pg_loss": pg}

    def loss_fn(model, batch):
        mask = batch["mask"]
        logp, logits, out = policy_forward(
            model, batch, sampling, replay=rc.routing_replay, mtp=want_mtp
        )
        loss, metrics = objective(logp, batch)
        if want_mtp:
            mtp, mtp_metrics = _mtp_loss(out, batch["tokens"], mask)
            metrics.update(mtp_metrics)
            loss = loss + rc.mtp_loss_weight * mtp
        metrics["entropy"] = jax.lax.stop_gradient(_entropy(logits, sampling, mask))
        metrics["dropped_fraction"] = mean_dropped_fraction(cfg, out.aux)
        metrics["loss"] = loss
        return loss, (metrics, out.aux["expert_load"])

    return loss_fn


def make_logp_fn(sampling: Sampling, replay: bool):
    """A jitted ``(graphdef, state, batch) -> logp [B, S - 1]`` (old-policy or reference pass)."""

    @jax.jit
    def logp_fn(graphdef, state, batch):
        model = nnx.merge(graphdef, state)
        return policy_forward(model, batch, sampling, replay=replay)[0]

    return lambda model, batch: logp_fn(*nnx.split(model), batch)


def make_r3_probe(cfg: ModelConfig, sampling: Sampling):
    """A jitted probe of train-inference mismatch, with and without routing replay.

    Returns:
      ``probe(model, batch) -> dict``: per mode m in ("replay", "no_replay"):
      ``r3_routing_disagreement_m`` (share of (response position, MoE layer) decisions where the
      training router's own top-k differs from the rollout's), ``r3_kl_m`` (k3 KL of the
      rollout's distribution to the training forward's, over sampled tokens) and
      ``r3_extreme_share_m`` (share of tokens with pi_train / pi_rollout outside [1/2, 2]).
    """
    moe = np.array([k == SPARSE for k in cfg.mlp_layer_types])

    @jax.jit
    def probe(graphdef, state, batch):
        model = nnx.merge(graphdef, state)
        mask = batch["mask"]
        rollout_routing = jnp.moveaxis(batch["routing"], 0, 1)  # [L, B, S - 1, k]
        out = {}
        for name, replay in (("replay", True), ("no_replay", False)):
            logp, _, o = policy_forward(model, batch, sampling, replay=replay)
            out[f"r3_routing_disagreement_{name}"] = r3.routing_disagreement(
                o.aux["router_choice"], rollout_routing, mask, moe
            )
            out[f"r3_kl_{name}"] = r3.train_inference_kl(logp, batch["rollout_logp"], mask)
            out[f"r3_extreme_share_{name}"] = r3.extreme_ratio_share(
                logp, batch["rollout_logp"], mask
            )
        return out

    return lambda model, batch: probe(*nnx.split(model), batch)
