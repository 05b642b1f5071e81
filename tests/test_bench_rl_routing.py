"""Smoke test of ``bench/rl_routing.py`` on a tiny model: the script runs end to end (SFT warm-up,
the R3-on and R3-off RL runs, the cost and speculative timings) and its JSON summarises the
runs' own ``metrics.jsonl``. Nothing here asserts speed."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "model.num_layers=2", "model.embed_dim=32", "model.mlp_dim=48", "model.moe_mlp_dim=24",
    "model.num_experts=4", "model.num_mtp_layers=1", "train.steps=1", "train.batch_size=4",
    "train.eval_every=1", "train.checkpoint_every=1", "sft.num_examples=8",
    "sft.heldout_prompts=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4",
    "rl.heldout_prompts=2", "keep_freed_memory=False",
)  # fmt: skip


def test_rl_routing_smoke(tmp_path):
    out = tmp_path / "rl_routing.json"
    argv = ["bench/rl_routing.py", f"--workdir={tmp_path}", "--steps=2", "--drafts=1",
            "--runs=1", f"--out={out}"] + [f"--set={s}" for s in TINY]  # fmt: skip
    # Numbers are not checked, so skip most XLA optimisations (as tests/test_readme.py does).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    r = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    for heading in ("1. R3 on vs off", "2. cost of recording", "3. speculative rollouts"):
        assert heading in r.stdout, r.stdout[-2000:]
    res = json.loads(out.read_text())
    for mode in ("on", "off"):
        run = res["rl_runs"][mode]
        with open(os.path.join(tmp_path, f"r3_{mode}", "metrics.jsonl")) as f:
            rows = [x for x in map(json.loads, f) if x["step"] >= 1]
        assert len(rows) == run["steps"] == 2  # log_every=1: every step logged
        for key in ("r3_kl_replay", "r3_kl_no_replay", "r3_routing_disagreement_replay"):
            np.testing.assert_allclose(run[key], np.mean([x[key] for x in rows]), rtol=1e-12)
        assert run["heldout_success_end"] == rows[-1]["heldout_success"]
        for key in ("r3_extreme_share_replay", "r3_routing_disagreement_no_replay"):
            assert 0 <= run[key] <= 1, (key, run[key])
    cost = res["cost"]
    assert cost["rollout_batch"] == 4
    assert cost["rollout_record_s"] > 0 and cost["train_step_replay_s"] > 0
    for when in ("start", "end"):
        spec = res["speculative"][when]
        assert spec["d0"]["mean_accepted_length"] == 1.0
        assert 1.0 <= spec["d1"]["mean_accepted_length"] <= 2.0
        assert len(spec["d1"]["acceptance_per_depth"]) == 1
        assert spec["d0"]["new_tokens"] > 0 and spec["d1"]["tokens_per_s"] > 0
    assert res["speculative"]["end"]["source"] == os.path.join(str(tmp_path), "r3_on")
