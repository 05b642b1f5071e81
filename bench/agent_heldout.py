"""Held-out solve rates of two agent checkpoints, task by task, with a paired test.

Each checkpoint plays the held-out tasks of ``configs/agent_tiny.py`` exactly as the RL run
evaluates them (``AgentSource.heldout_episodes``: one greedy episode per task, and
``agent.heldout_samples`` sampled at ``rl.temperature``). Per task, the change from BEFORE to
AFTER is the difference of solved shares; the script prints both rates, how many tasks went up
and down, and a two-sided paired sign-flip permutation p-value for the mean change (100,000
random sign patterns): whether a gain is more than which tasks happen to be in the held-out set
and which episodes happen to be sampled.

    python bench/agent_heldout.py --before=runs/agent_tiny/sft --after=runs/agent_tiny

A checkpoint is a workdir (its latest step) or ``WORKDIR:STEP``. ``--config`` (default
``configs/agent_tiny.py``) with ``--set FIELD=VALUE`` overrides (e.g.
``agent.heldout_samples=8``). Writes ``--out`` (bench/results/agent_heldout.json).
"""

import argparse
import os

import common
import numpy as np

from mimo_jax import checkpoint, data
from mimo_jax.post_training.agent import episodes

PERMUTATIONS = 100_000


def solved(source: episodes.AgentSource, spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per task: greedy solved (0/1) and the solved share of the sampled episodes ([N] each;
    None without ``agent.heldout_samples``)."""
    workdir, _, step = spec.partition(":")
    model = checkpoint.load_model(workdir, int(step) if step else None)
    greedy, sampled = source.heldout_episodes(model)
    g = np.array([e.reward == 1.0 for e in greedy], np.float64)
    if not sampled:
        return g, None
    s = np.array([e.reward == 1.0 for e in sampled], np.float64).reshape(len(g), -1)
    return g, s.mean(axis=1)


def paired(before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean change, tasks up / down, and the sign-flip permutation p-value of the mean change."""
    d = after - before  # [N]
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(PERMUTATIONS, len(d)))
    null = np.abs((signs * d).mean(axis=1))
    p = float(np.mean(null >= abs(d.mean()) - 1e-12))
    return {"before": float(before.mean()), "after": float(after.mean()),
            "change": float(d.mean()), "up": int((d > 0).sum()), "down": int((d < 0).sum()),
            "p": p}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="WORKDIR or WORKDIR:STEP")
    parser.add_argument("--after", required=True, help="WORKDIR or WORKDIR:STEP")
    parser.add_argument("--config", default=os.path.join(common.REPO, "configs", "agent_tiny.py"))
    parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE override")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "agent_heldout.json"))
    args = parser.parse_args()
    config = common.load_config(args.config, args.set)
    source = episodes.AgentSource(config, data.load_tokenizer(config.data.tokenizer))
    (gb, sb), (ga, sa) = solved(source, args.before), solved(source, args.after)
    k, n = config.agent.heldout_samples, len(gb)
    rows = {"greedy": paired(gb, ga)}
    if k:
        rows[f"sampled (T={config.rl.temperature}, {k} per task)"] = paired(sb, sa)
    print(f"held-out tasks: {n}; before {args.before}, after {args.after}")
    print(f"{'rate':<28} {'before':>7} {'after':>7} {'change':>7} {'up':>4} {'down':>5} {'p':>7}")
    for name, r in rows.items():
        print(f"{name:<28} {r['before']:>7.3f} {r['after']:>7.3f} {r['change']:>+7.3f} "
              f"{r['up']:>4} {r['down']:>5} {r['p']:>7.4f}")  # fmt: skip
    result = {"before": args.before, "after": args.after, "tasks": n, **rows}
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
