"""Rollout routing replay (R3) on the tiny RL setup: what it fixes, what it costs, and
speculative rollouts at the start and the end of RL.

On ``configs/rl_tiny.py`` (bf16 rollouts of the fp32 policy), from one SFT checkpoint
(``<workdir>/sft``, made first with ``sft.run`` when it holds none):

1. R3 on vs off: two RL runs (``rl.run``, ``config.rl.routing_replay`` True / False, everything
   else equal, metrics logged every step) in ``<workdir>/r3_on`` and ``<workdir>/r3_off``,
   both started afresh (an earlier run there is deleted). Side by side, averaged over each run:
   the R3 probe's routing disagreement, train-inference k3 KL and extreme-ratio share (each
   measured with and without replay on the same rollouts), mean reward, the held-out success at
   the start and the end, and each run's wall time (SFT excluded; compilation and held-out
   evaluations included).
2. What recording and replaying routing costs: one rollout batch (P x G prompts,
   ``rollout.sample``) with ``record=True`` (log-probs and routing) vs ``record=False``, and one
   jitted RL training step (``train.make_train_step`` with ``rl_step.make_loss_fn``) with
   replay vs without on the same batch; medians of interleaved repeats after compilation.
3. Speculative rollouts: tokens/s of one rollout batch (recording, as RL samples) with 0 and
   with ``--drafts`` MTP drafts, mean accepted length and per-depth acceptance, for the SFT
   checkpoint (start of RL) and the R3 run's final checkpoint (end of RL).

    python bench/rl_routing.py --workdir=runs/rl_routing [--steps 200 --runs 7]

``--set FIELD=VALUE`` overrides a config field (e.g. ``--set rl.prompts_per_step=4``), for smoke
runs. Writes bench/results/rl_routing.json.
"""

import argparse
import copy
import json
import os
import shutil
import time

import common
import jax
import ml_collections
import numpy as np
from flax import nnx

import process_setup
from mimo_jax import checkpoint, data
from mimo_jax import sharding as sh
from mimo_jax.generate import generate
from mimo_jax.post_training import policy, rl, rl_step, rollout, sft
from mimo_jax.sampling import Sampling
from mimo_jax.train import make_optimizer, make_train_step, model_config

MODES = (("on", True), ("off", False))
R3_METRICS = ("routing_disagreement", "kl", "extreme_share")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/rl_tiny.py", help="an RL config file")
    p.add_argument("--workdir", default="runs/rl_routing", help="sft/, r3_on/, r3_off/ go here")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: config's)")
    p.add_argument("--drafts", type=int, default=3, help="MTP drafts of the speculative rollouts")
    p.add_argument("--runs", type=int, default=7, help="timed repeats per measurement (median)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable), e.g. rl.group_size=4")  # fmt: skip
    p.add_argument("--out", default=os.path.join(common.RESULTS, "rl_routing.json"))
    return p.parse_args(argv)


def load_config(a: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config file's ``get_config()`` with ``--set`` and ``--steps`` applied."""
    config = common.load_config(a.config, a.set)
    if a.steps is not None:
        config.rl.steps = a.steps
    return config


def ensure_sft(config: ml_collections.ConfigDict, sft_dir: str) -> float:
    """Runs the SFT warm-up into ``sft_dir`` unless it holds a checkpoint; its wall seconds."""
    if os.path.isdir(sft_dir):
        ckpt = checkpoint.Checkpointer(sft_dir)
        try:
            if ckpt.latest_step() is not None:
                print(f"SFT checkpoint found in {sft_dir} (step {ckpt.latest_step()})", flush=True)
                return 0.0
        finally:
            ckpt.close()
    t0 = time.perf_counter()
    sft.run(config, sft_dir)
    return time.perf_counter() - t0


def rl_runs(config: ml_collections.ConfigDict, workdir: str, sft_dir: str) -> dict:
    """The two RL runs (R3 on / off) from ``sft_dir``; per mode its summary of metrics.jsonl."""
    out = {}
    for name, replay in MODES:
        c = copy.deepcopy(config)
        c.init_from = sft_dir
        c.rl.routing_replay = replay
        c.rl.log_every = 1  # the R3 probe runs on every step's rollouts
        run_dir = os.path.join(workdir, f"r3_{name}")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its wall time is measured
        t0 = time.perf_counter()
        rl.run(c, run_dir)
        wall = time.perf_counter() - t0
        out[name] = summarize(run_dir, wall)
    return out


def summarize(run_dir: str, wall_s: float) -> dict:
    """Averages over a run's steps of the R3 probe and the reward, and its held-out success."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if r["step"] >= 1]
    heldout = [r for r in rows if "heldout_success" in r]
    s = {
        "workdir": run_dir,
        "steps": len(steps),
        "wall_s": wall_s,
        "reward_mean": float(np.mean([r["reward_mean"] for r in steps])),
        "reward_mean_last10": float(np.mean([r["reward_mean"] for r in steps[-10:]])),
        "heldout_success_start": heldout[0]["heldout_success"],
        "heldout_success_end": heldout[-1]["heldout_success"],
    }
    for m in R3_METRICS:
        for probe in ("replay", "no_replay"):
            key = f"r3_{m}_{probe}"
            s[key] = float(np.mean([r[key] for r in steps]))
    return s


def rollout_prompts(config: ml_collections.ConfigDict, task) -> list[str]:
    """RL step 0's prompts, each repeated group_size times (what ``rl._sample`` samples)."""
    rc = config.rl
    prompts = task.train_prompts(rl.step_seed(config.seed, 0, 0), rc.prompts_per_step)
    return [p for p in prompts for _ in range(rc.group_size)]


def recording_cost(config, cfg, sft_dir, task, tokenizer, runs) -> dict:
    """Rollout with vs without recording, and a training step with vs without replay."""
    rc = config.rl
    model = policy.init_model(config, cfg, init_from=sft_dir)
    roll = rollout.rollout_model(model, rc.rollout_dtype)
    prompts = rollout_prompts(config, task)
    seed = rl.step_seed(config.seed, 0, 1)

    def sample(record):
        return rollout.sample(
            roll, tokenizer, prompts, prompt_len=rollout.PROMPT_LEN,
            max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
            seed=seed, record=record,
        )  # fmt: skip

    roll_s = common.interleaved_medians(
        {"record": lambda: sample(True), "plain": lambda: sample(False)}, runs
    )

    ro = sample(True)
    batch = rl_step.build_batch(ro, rl.score(task, ro), rc)
    micro = {k: sh.put_batch(np.asarray(v)[None], batch_dim=1) for k, v in batch.items()}
    sampling = Sampling(float(rc.temperature), int(rc.top_k), 1.0)
    fns = {}
    for name, replay in (("replay", True), ("no_replay", False)):
        rcm = ml_collections.ConfigDict(rc.to_dict())
        rcm.routing_replay = replay
        m = policy.init_model(config, cfg, init_from=sft_dir)  # each variant its own state
        opt = make_optimizer(m, rl._optimizer_fields(rcm))
        graphdef, state = nnx.split((m, opt))
        step = make_train_step(
            graphdef, cfg, rl._optimizer_fields(rcm), sh.state_shardings((m, opt)),
            loss_fn=rl_step.make_loss_fn(cfg, rcm, sampling),
        )  # fmt: skip
        holder = {"state": state}

        def train(step=step, holder=holder):  # the state is donated: carry the new one
            holder["state"], metrics = step(holder["state"], micro)
            jax.block_until_ready(metrics)

        fns[name] = train
    step_s = common.interleaved_medians(fns, runs)
    return {
        "rollout_record_s": roll_s["record"],
        "rollout_plain_s": roll_s["plain"],
        "rollout_record_over_plain": roll_s["record"] / roll_s["plain"],
        "train_step_replay_s": step_s["replay"],
        "train_step_no_replay_s": step_s["no_replay"],
        "train_step_replay_over_no_replay": step_s["replay"] / step_s["no_replay"],
        "rollout_batch": len(prompts),
    }


def speculative(config, cfg, source, task, tokenizer, drafts, runs) -> dict:
    """Rollout tokens/s with 0 and ``drafts`` MTP drafts, and the acceptance, for one model."""
    rc = config.rl
    model = policy.init_model(config, cfg, init_from=source)
    roll = rollout.rollout_model(model, rc.rollout_dtype)
    ids, lengths = rollout.encode_prompts(
        tokenizer, rollout_prompts(config, task), rollout.PROMPT_LEN
    )
    stop = rollout.stop_token(tokenizer)
    seed = rl.step_seed(config.seed, 0, 1)

    def call(d):
        res = generate(
            roll, ids, prompt_lengths=lengths, max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature, top_k=rc.top_k, seed=seed, num_draft_tokens=d,
            eos_token_id=stop, return_logprobs=True, return_routing=True,
        )  # fmt: skip
        jax.block_until_ready(res.tokens)
        return res

    counts = (0, drafts)
    med = common.interleaved_medians({d: (lambda d=d: call(d)) for d in counts}, runs)
    out = {"source": source}
    for d in counts:
        res = call(d)
        new = int(np.sum(np.asarray(res.lengths) - lengths))
        out[f"d{d}"] = {
            "num_draft_tokens": d,
            "median_s": med[d],
            "new_tokens": new,
            "tokens_per_s": new / med[d],
            "mean_accepted_length": float(res.mean_accepted_length),
            "acceptance_per_depth": np.asarray(res.acceptance_rate).tolist() if d else [],
        }
    out["speedup"] = out[f"d{drafts}"]["tokens_per_s"] / out["d0"]["tokens_per_s"]
    return out


def print_tables(r: dict, drafts: int) -> None:
    runs, cost, spec = r["rl_runs"], r["cost"], r["speculative"]
    on, off = runs["on"], runs["off"]
    print(
        f"\n1. R3 on vs off: {on['steps']} RL steps each from {r['sft_dir']}, "
        f"{r['rollout_dtype']} rollouts of the {r['param_dtype']} policy"
    )
    print(
        "R3 probe, mean over the steps (each run's own rollouts scored by its policy, replaying "
        "the rollout's experts and routing afresh; the R3-on run trains on the first, the "
        "R3-off run on the second)"
    )
    head = f"{'replay':>10} {'no replay':>10} {'no/with':>8}"
    print(f"{'metric':<40} {'R3-on run:':>10} {'':>19}   {'R3-off run:':>11}")
    print(f"{'':<40} {head}   {head}")
    names = {
        "routing_disagreement": "routing disagreement (token, MoE layer)",
        "kl": "train-inference k3 KL",
        "extreme_share": "ratio outside [1/2, 2] share",
    }

    def ratio(a, b):
        return f"{a / b:>7.2f}x" if b else f"{'-':>8}"

    for m in R3_METRICS:
        cells = []
        for run in (on, off):
            w, wo = run[f"r3_{m}_replay"], run[f"r3_{m}_no_replay"]
            cells.append(f"{w:>10.2e} {wo:>10.2e} {ratio(wo, w)}")
        print(f"{names[m]:<40} {cells[0]}   {cells[1]}")

    print(f"\n{'run':<44} {'R3 on':>10} {'R3 off':>10} {'on/off':>8}")

    def row(label, a, b, fmt="{:>10.4f}"):
        print(f"{label:<44} {fmt.format(a)} {fmt.format(b)} {ratio(a, b)}")

    row("mean reward", on["reward_mean"], off["reward_mean"])
    row("mean reward, last 10 steps", on["reward_mean_last10"], off["reward_mean_last10"])
    row("held-out success, start", on["heldout_success_start"], off["heldout_success_start"])
    row("held-out success, end", on["heldout_success_end"], off["heldout_success_end"])
    row("wall s (compilation, held-out evals incl.)", on["wall_s"], off["wall_s"], "{:>10.1f}")
    print(
        "(the R3-on run goes first and also compiles the rollout and held-out generate calls, "
        "which the R3-off run reuses; section 2 times the steps without compilation)"
    )

    print(f"\n2. cost of recording and replaying routing (median of {r['runs']}, after compile)")
    print(f"{'what':<44} {'with':>10} {'without':>10} {'ratio':>8}")
    row(
        f"rollout batch ({cost['rollout_batch']} seqs) s, recording",
        cost["rollout_record_s"],
        cost["rollout_plain_s"],
    )
    row("RL train step s, replay", cost["train_step_replay_s"], cost["train_step_no_replay_s"])

    print(f"\n3. speculative rollouts (one rollout batch, recording; median of {r['runs']})")
    print(
        f"{'model':<22} {'drafts':>6} {'median s':>9} {'tokens/s':>9} {'vs 0':>6} "
        f"{'mean acc':>9}  acceptance per depth"
    )
    for when in ("start", "end"):
        s = spec[when]
        label = f"{when} ({os.path.basename(s['source'])})"
        for d in (0, drafts):
            x = s[f"d{d}"]
            acc = " ".join(f"{v:.2f}" for v in x["acceptance_per_depth"]) or "-"
            print(
                f"{label:<22} {d:>6} {x['median_s']:>9.3f} {x['tokens_per_s']:>9.0f} "
                f"{x['tokens_per_s'] / s['d0']['tokens_per_s']:>5.2f}x "
                f"{x['mean_accepted_length']:>9.2f}  {acc}"
            )


def main(argv=None):
    a = parse_args(argv)
    config = load_config(a)
    if config.get("keep_freed_memory"):
        process_setup.keep_freed_memory()  # before the backend starts its threads
    cfg = model_config(config)
    if not 1 <= a.drafts <= cfg.num_mtp_layers:
        raise ValueError(f"--drafts={a.drafts} must be in 1..{cfg.num_mtp_layers} (MTP layers)")
    task = policy.task_from_config(config)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    sft_dir = os.path.join(a.workdir, "sft")
    sft_s = ensure_sft(config, sft_dir)
    runs = rl_runs(config, a.workdir, sft_dir)
    with sh.use_mesh(sh.make_mesh(config.mesh.shape), config.mesh.rules):
        cost = recording_cost(config, cfg, sft_dir, task, tokenizer, a.runs)
        spec = {
            when: speculative(config, cfg, src, task, tokenizer, a.drafts, a.runs)
            for when, src in (("start", sft_dir), ("end", runs["on"]["workdir"]))
        }
    result = {
        "flags": {k: v for k, v in vars(a).items() if k != "out"},
        "config": a.config,
        "sft_dir": sft_dir,
        "sft_s": sft_s,
        "rl_steps": config.rl.steps,
        "rollout_dtype": config.rl.rollout_dtype,
        "param_dtype": cfg.param_dtype,
        "runs": a.runs,
        "rl_runs": runs,
        "cost": cost,
        "speculative": spec,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "host": common.host_info(),
    }
    print_tables(result, a.drafts)
    common.write_json(result, a.out)


if __name__ == "__main__":
    main()
