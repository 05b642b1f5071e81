"""Smoke test of ``bench/mopd_table.py`` on a tiny model: the script makes the teachers and the
student, runs every method under one step budget, and its table is the runs' own held-out
success (measured afresh on the final checkpoints, equal to what the runs logged). Nothing here
asserts speed or quality."""

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
    "sft.heldout_prompts=2", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2",
    "rl.max_new_tokens=4", "rl.heldout_prompts=3", "rl.log_every=1", "keep_freed_memory=False",
)  # fmt: skip


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mopd_table_smoke(tmp_path):
    out = tmp_path / "mopd_table.json"
    argv = ["bench/mopd_table.py", f"--workdir={tmp_path}", "--steps=3", f"--out={out}"]
    argv += [f"--set={s}" for s in TINY]
    # Numbers are not checked, so skip most XLA optimisations (as tests/test_readme.py does).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    r = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    for text in ("Held-out success", "MOPD vs the reversal teacher", "mean teacher_share"):
        assert text in r.stdout, r.stdout[-2000:]
    res = json.loads(out.read_text())
    domains = res["domains"]
    assert sorted(domains) == ["addition", "reversal"] and res["rl_steps"] == 3
    score, runs = res["heldout"], res["runs"]
    table = os.path.join(str(tmp_path), "mopd_table")
    # Whole-mixture runs: the table's scores are the final step's logged ones.
    for m in ("mopd", "mopd_alpha0", "grpo_mix"):
        last = _rows(runs[m]["final"])[-1]
        assert last["step"] == 3
        for d in domains:
            assert score[m][d] == last[f"heldout_success_{d}"], (m, d)
    assert res["runs"]["mopd_alpha0"]["alpha"] == 0.0
    # Sequential: reversal for 2 steps (3 // 2 + 1), then addition for 1 from its checkpoint.
    seq = runs["sequential"]["runs"]
    assert seq == [os.path.join(table, "seq_reversal"), os.path.join(table, "seq_addition")]
    assert [_rows(wd)[-1]["step"] for wd in seq] == [2, 1]
    assert score["sequential"]["addition"] == _rows(seq[1])[-1]["heldout_success"]
    assert score["student"]["reversal"] == _rows(seq[0])[0]["heldout_success"]  # its step 0
    for d in domains:
        teacher = _rows(res["teacher_dirs"][d])
        assert score["teachers"][d] == teacher[-1]["heldout_success"]
        # Each teacher is the student RL'd on its domain: its step 0 is the student.
        assert teacher[0]["step"] == 0 and teacher[0]["heldout_success"] == score["student"][d]
        gap = score["mopd"][d] - score["teachers"][d]
        np.testing.assert_allclose(res["mopd_gap"][d], gap, rtol=1e-12)
        assert res["mopd_reaches_teacher"][d] == (gap >= -0.02)
    for m, lost in res["lost_domains"].items():
        assert lost == [d for d in domains if score[m][d] < score["student"][d]]
    assert res["teacher_share"]["mopd"] > 0
    # A second call reuses every finished run (no new metrics rows) and prints the same table.
    before = {m: len(_rows(runs[m]["final"])) for m in ("mopd", "grpo_mix")}
    r2 = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {m: len(_rows(runs[m]["final"])) for m in before} == before
    assert json.loads(out.read_text())["heldout"] == score
