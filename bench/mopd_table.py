"""The report's Table 7 in miniature: multi-teacher on-policy distillation (MOPD) against RL
baselines on two tasks, under one RL step budget.

On ``configs/mopd_tiny.py``, from a domain teacher per task and a student SFT'd on the mixture
(made first with ``rl.run`` / ``sft.run`` when ``<workdir>`` does not hold them):

* student: ``<workdir>/mopd_student`` (``get_config()``, SFT on both tasks); teachers:
  ``<workdir>/teacher_<domain>`` (``get_config("teacher_<domain>")``: the student, GRPO'd on
  that task alone);
* methods, each from the student with ``--steps`` RL steps in all, in
  ``<workdir>/mopd_table/<method>`` (a finished run is reused, an interrupted one resumes):

  - ``mopd``: ``mopd.run`` with the config's ``mopd.alpha`` (teacher reverse-KL advantage plus
    alpha times the outcome advantage);
  - ``sequential``: GRPO (``rl.run``) on one domain after the other (``--sequence``), the budget
    split evenly, each stage starting from the previous one (``seq_<domain>``);
  - ``grpo_mix``: GRPO with the outcome reward on the mixture;
  - ``mopd_alpha0``: MOPD without the outcome term (``mopd.alpha = 0``).

Each model's held-out success is measured here for every domain (``rollout.heldout_success``,
greedy, ``config.rl.heldout_prompts`` prompts: the same numbers the runs log), so the
single-domain stages are scored on the other domain too. The table gives, per domain, the
student before, its teacher and each method after (with the ratio to the teacher), marks whether
MOPD is within ``--margin`` of each teacher or above it and which method ended a domain below the
student's start; then each method's wall time (that of the call that finished the run:
compilation and held-out evaluations included) and MOPD's mean teacher share (teacher scoring
time over rollout plus training time).

    python bench/mopd_table.py --workdir=runs [--steps 800]

``--set FIELD=VALUE`` overrides a field of every config (student and teachers), for smoke runs.
Writes bench/results/mopd_table.json.
"""

import argparse
import copy
import json
import os
import time

import common
import jax
import ml_collections
import numpy as np

import process_setup
from mimo_jax import checkpoint, data
from mimo_jax import sharding as sh
from mimo_jax.post_training import mopd, policy, rl, rollout, sft
from mimo_jax.train import model_config

METHODS = ("mopd", "sequential", "grpo_mix", "mopd_alpha0")
WALL_FILE = "bench_wall_s.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/mopd_tiny.py", help="the MOPD config file")
    p.add_argument("--workdir", default="runs", help="teachers, student and mopd_table/ go here")
    p.add_argument("--steps", type=int, default=None, help="RL steps per method (config's)")
    p.add_argument("--sequence", default="reversal,addition",
                   help="domain order of the sequential-RL baseline")  # fmt: skip
    p.add_argument("--margin", type=float, default=0.02, help="MOPD 'reaches' a teacher within")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable), e.g. rl.group_size=4")  # fmt: skip
    p.add_argument("--out", default=os.path.join(common.RESULTS, "mopd_table.json"))
    return p.parse_args(argv)


def load_config(a: argparse.Namespace, arg: str = "student") -> ml_collections.ConfigDict:
    """The config file's ``get_config(arg)`` with ``--set`` applied."""
    return common.load_config(a.config, a.set, arg)


def latest_step(workdir: str) -> int | None:
    """The workdir's latest checkpoint step, None without one."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def ensure(run_fn, config: ml_collections.ConfigDict, workdir: str, steps: int) -> float | None:
    """``run_fn(config, workdir)`` unless ``workdir`` holds step ``steps``; its wall seconds.

    A finished run's seconds are those this script recorded when it finished it (None for a run
    made elsewhere, e.g. by the README's commands).
    """
    wall_file = os.path.join(workdir, WALL_FILE)
    if latest_step(workdir) == steps:
        print(f"{workdir}: finished (step {steps}), reused", flush=True)
        if os.path.isfile(wall_file):
            with open(wall_file) as f:
                return json.load(f)["wall_s"]
        return None
    t0 = time.perf_counter()
    run_fn(config, workdir)
    wall = time.perf_counter() - t0
    with open(wall_file, "w") as f:
        json.dump({"wall_s": wall}, f)
    return wall


def narrowed(config: ml_collections.ConfigDict, domain: str) -> ml_collections.ConfigDict:
    """``config`` with ``config.domains`` reduced to ``domain`` (a one-task run)."""
    c = copy.deepcopy(config)
    for d in list(c.domains):
        if d != domain:
            del c.domains[d]
    return c


def method_runs(config, a, student_dir: str, root: str) -> dict:
    """Every method's runs from the student: {method: {"final": workdir, "wall_s", "runs"}}."""
    steps = config.rl.steps
    out = {}

    def one(name, fn, c, init_from, n):
        c = copy.deepcopy(c)
        c.init_from, c.rl.steps = init_from, n
        workdir = os.path.join(root, name)
        return workdir, ensure(fn, c, workdir, n)

    for name, alpha in (("mopd", config.mopd.alpha), ("mopd_alpha0", 0.0)):
        c = copy.deepcopy(config)
        c.mopd.alpha = alpha
        wd, wall = one(name, mopd.run, c, student_dir, steps)
        out[name] = {"final": wd, "wall_s": wall, "runs": [wd], "alpha": alpha}
    wd, wall = one("grpo_mix", rl.run, config, student_dir, steps)
    out["grpo_mix"] = {"final": wd, "wall_s": wall, "runs": [wd]}
    sequence = a.sequence.split(",")
    if sorted(sequence) != sorted(config.domains):
        raise ValueError(f"--sequence={a.sequence!r}: a permutation of {list(config.domains)}")
    init_from, walls, runs = student_dir, [], []
    for i, domain in enumerate(sequence):
        n = steps // len(sequence) + (i < steps % len(sequence))
        wd, wall = one(f"seq_{domain}", rl.run, narrowed(config, domain), init_from, n)
        init_from = wd
        walls.append(wall)
        runs.append(wd)
    total = None if None in walls else sum(walls)
    out["sequential"] = {"final": init_from, "wall_s": total, "runs": runs}
    return {m: out[m] for m in METHODS}


def heldout(config, cfg, mixture, tokenizer, source: str, domains) -> dict[str, float]:
    """Greedy held-out success of the model in ``source`` on each of ``domains``."""
    model = policy.init_model(config, cfg, init_from=source)
    return {
        d: rollout.heldout_success(
            model,
            mixture.task(d),
            tokenizer,
            num_prompts=config.rl.heldout_prompts,
            prompt_len=rollout.PROMPT_LEN,
        )  # fmt: skip
        for d in domains
    }


def mean_metric(workdir: str, key: str) -> float:
    """Mean of ``key`` over the rows of a run's metrics.jsonl that have it."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        values = [r[key] for r in map(json.loads, f) if key in r]
    return float(np.mean(values))


def print_table(r: dict, margin: float) -> None:
    domains, score, methods = r["domains"], r["heldout"], METHODS
    print(
        f"\nHeld-out success (greedy, {r['heldout_prompts']} held-out prompts per domain); "
        f"every method starts from the student with {r['rl_steps']} RL steps"
    )
    head = "".join(f"{m:>16}" for m in methods)
    print(f"{'domain':<10}{'student':>9}{'teacher':>9}{head}")
    for d in domains:
        t = score["teachers"][d]
        cells = "".join(
            f"{score[m][d]:>8.3f} ({score[m][d] / t:.2f}x)" if t else f"{score[m][d]:>16.3f}"
            for m in methods
        )
        print(f"{d:<10}{score['student'][d]:>9.3f}{t:>9.3f}{cells}")
    print("(in brackets: the method's score over the teacher's)")
    for d in domains:
        gap = r["mopd_gap"][d]
        verdict = "reaches it" if r["mopd_reaches_teacher"][d] else "does not reach it"
        print(
            f"MOPD vs the {d} teacher: {score['mopd'][d]:.3f} - {score['teachers'][d]:.3f} = "
            f"{gap:+.3f}: {verdict} (within {margin} or above)"
        )
    for m in methods:
        lost = r["lost_domains"][m]
        print(f"{m:<12} lost a domain it started with (final < student): {', '.join(lost) or '-'}")
    walls = "".join(
        f"{r['wall_s'][m]:>16.1f}" if r["wall_s"][m] is not None else f"{'-':>16}" for m in methods
    )
    print(f"{'wall s':<28}{walls}")
    print(
        f"MOPD mean teacher_share (teacher scoring s / (rollout + train) s): "
        f"{r['teacher_share']['mopd']:.3f} (alpha 0: {r['teacher_share']['mopd_alpha0']:.3f})"
    )
    print(f"script wall time: {r['script_wall_s']:.1f} s")


def main(argv=None):
    t_start = time.perf_counter()
    a = parse_args(argv)
    config = load_config(a)
    if config.get("keep_freed_memory"):
        process_setup.keep_freed_memory()  # before the backend starts its threads
    if a.steps is not None:
        config.rl.steps = a.steps
    domains = list(config.domains)
    student_dir = os.path.join(a.workdir, "mopd_student")
    config.mopd.teachers = ml_collections.ConfigDict(
        {d: os.path.join(a.workdir, f"teacher_{d}") for d in domains}
    )
    setup_wall = {"student": ensure(sft.run, config, student_dir, config.train.steps)}
    for d in domains:  # each teacher: the student, RL'd on its domain alone
        tc = load_config(a, f"teacher_{d}")
        tc.init_from = student_dir
        setup_wall[f"teacher_{d}"] = ensure(rl.run, tc, config.mopd.teachers[d], tc.rl.steps)
    runs = method_runs(config, a, student_dir, os.path.join(a.workdir, "mopd_table"))

    cfg = model_config(config)
    mixture = policy.mixture_from_config(config)
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    with sh.use_mesh(sh.make_mesh(config.mesh.shape), config.mesh.rules):
        score = {"student": heldout(config, cfg, mixture, tokenizer, student_dir, domains)}
        score["teachers"] = {
            d: heldout(config, cfg, mixture, tokenizer, config.mopd.teachers[d], [d])[d]
            for d in domains
        }
        for m in METHODS:
            score[m] = heldout(config, cfg, mixture, tokenizer, runs[m]["final"], domains)
    gap = {d: score["mopd"][d] - score["teachers"][d] for d in domains}
    result = {
        "flags": {k: v for k, v in vars(a).items() if k != "out"},
        "domains": domains,
        "rl_steps": config.rl.steps,
        "heldout_prompts": config.rl.heldout_prompts,
        "alpha": config.mopd.alpha,
        "student_dir": student_dir,
        "teacher_dirs": dict(config.mopd.teachers),
        "runs": runs,
        "heldout": score,
        "mopd_gap": gap,
        "mopd_reaches_teacher": {d: bool(gap[d] >= -a.margin) for d in domains},
        "lost_domains": {
            m: [d for d in domains if score[m][d] < score["student"][d]] for m in METHODS
        },
        "wall_s": {m: runs[m]["wall_s"] for m in METHODS},
        "setup_wall_s": setup_wall,
        "teacher_share": {
            m: mean_metric(runs[m]["final"], "teacher_share") for m in ("mopd", "mopd_alpha0")
        },
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "host": common.host_info(),
    }
    result["script_wall_s"] = time.perf_counter() - t_start
    print_table(result, a.margin)
    common.write_json(result, a.out)


if __name__ == "__main__":
    main()
