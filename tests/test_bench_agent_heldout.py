"""``bench/agent_heldout.py``: the paired permutation test, and the script end to end on two
checkpoints of a two-step agent SFT run. Nothing here asserts a solve rate."""

import json
import os
import subprocess
import sys

import numpy as np

from mimo_jax.post_training import sft
from tests.test_agent_rl import _small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import agent_heldout  # noqa: E402  (bench/ is not a package)


def test_paired_permutation_test():
    same = np.array([0.0, 1.0, 0.5, 0.25] * 8)
    r = agent_heldout.paired(same, same)
    assert (r["change"], r["up"], r["down"], r["p"]) == (0.0, 0, 0, 1.0)
    # Every task up: only the all-plus and all-minus of 2^32 sign patterns are as extreme.
    r = agent_heldout.paired(np.zeros(32), np.ones(32))
    assert r["change"] == 1.0 and r["up"] == 32 and r["p"] < 1e-3
    # Half up, half down by as much: no change, p near 1.
    r = agent_heldout.paired(np.zeros(32), np.array([1.0, -1.0] * 16))
    assert r["change"] == 0.0 and r["up"] == r["down"] == 16 and r["p"] > 0.9


def test_agent_heldout_script_end_to_end(tmp_path):
    c = _small_config()
    c.train.checkpoint_every = 1
    c.agent.heldout_samples = 0  # the warm-up's own evaluation: greedy only (the script samples)
    sft.run(c, str(tmp_path / "sft"))
    out = tmp_path / "agent_heldout.json"
    sets = {
        "model.num_layers": 2,
        "model.embed_dim": 32,
        "agent.heldout_tasks": 3,
        "agent.max_turn_tokens": 24,
        "agent.max_turns": 3,
        "agent.heldout_samples": 2,
    }
    argv = ["bench/agent_heldout.py", f"--before={tmp_path}/sft:1", f"--after={tmp_path}/sft",
            f"--out={out}", *(f"--set={k}={v}" for k, v in sets.items())]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tasks"] == 3
    for name in ("greedy", f"sampled (T={c.rl.temperature}, 2 per task)"):
        row = result[name]
        assert 0 <= row["before"] <= 1 and 0 <= row["after"] <= 1 and 0 <= row["p"] <= 1
        assert row["up"] + row["down"] <= 3 and f"{row['after']:.3f}" in r.stdout
