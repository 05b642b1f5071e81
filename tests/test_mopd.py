"""MOPD (``mimo_jax.post_training.mopd``): each row is scored by its domain's teacher (of any
size), MOPD steps lower the reverse KL to a fixed teacher, a resumed run follows the
uninterrupted one, and a missing teacher or another tokenizer is a clear error."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from chat_testing import write_tokenizer_dir
from flax import nnx

from configs import mopd_tiny
from mimo_jax import checkpoint, train
from mimo_jax import sharding as sh
from mimo_jax.data import ByteTokenizer
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import mopd, policy, rl, rl_step, rollout
from mimo_jax.sampling import Sampling

SAMPLING = Sampling(1.0, 0, 1.0)
SMALL = dict(embed_dim=32, mlp_dim=48, moe_mlp_dim=24, num_experts=4, num_mtp_layers=1)


def _config(teachers, **rl_fields):
    c = mopd_tiny.get_config()
    c.model.update(SMALL)
    c.train.update(steps=2, batch_size=4, log_every=1, eval_every=2, checkpoint_every=2)
    c.sft.update(num_examples=16, heldout_prompts=4)
    c.rl.update(
        steps=4, prompts_per_step=2, group_size=2, max_new_tokens=4, log_every=1,
        heldout_every=2, heldout_prompts=4, checkpoint_every=2,
    )  # fmt: skip
    c.rl.update(rl_fields)
    c.mopd.teachers.update(teachers)
    return c


def _save_workdir(path, cfg, seed):
    """A workdir holding a random model of ``cfg`` (a teacher)."""
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(seed))
    checkpoint.save_model_config(str(path), cfg)
    ckpt = checkpoint.Checkpointer(str(path))
    ckpt.save(1, model)
    ckpt.close()
    return model


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teachers: one of the student's architecture, one smaller and shallower."""
    root = tmp_path_factory.mktemp("teachers")
    # A wide init: the two teachers' distributions are far apart, so a mix-up shows.
    cfg = dataclasses.replace(train.model_config(_config({})), initializer_range=0.3)
    other = dataclasses.replace(
        cfg, embed_dim=48, layer_types=cfg.layer_types[:3],
        mlp_layer_types=cfg.mlp_layer_types[:3],
    )  # fmt: skip
    same = _save_workdir(root / "same", cfg, seed=5)
    small = _save_workdir(root / "small", other, seed=6)
    return {"reversal": (str(root / "same"), same), "addition": (str(root / "small"), small)}


@nnx.jit
def _score(model, tokens):
    return rl_step.policy_forward(model, {"tokens": tokens}, SAMPLING, replay=False)[0]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_each_row_is_scored_by_its_domains_teacher(teachers):
    """Teachers.logp: rows of each domain get exactly their teacher's log-probs, the smaller
    teacher included."""
    c = _config({d: path for d, (path, _) in teachers.items()})
    mixture = policy.mixture_from_config(c)
    with sh.use_mesh(sh.make_mesh(c.mesh.shape), c.mesh.rules):  # as run() builds them
        t = mopd.Teachers(c, mixture, ByteTokenizer(), init_from="")
    student = MiMoV2Flash(train.model_config(c), rngs=nnx.Rngs(0))
    ro, domains = rl._sample(student, mixture, ByteTokenizer(), c.rl, seed=0, step=0)
    batch = rl_step.build_batch(ro, np.zeros(len(domains), np.float32), c.rl)
    got = t.logp(batch, domains)
    rows = np.array(domains)
    assert set(domains) == {"reversal", "addition"}
    for domain, (_, model) in teachers.items():
        bf16 = t.models[domain]
        assert bf16.cfg.embed_dim == model.cfg.embed_dim and bf16.cfg.dtype == "bfloat16"
        tokens = batch["tokens"][rows == domain]
        mask = batch["mask"][rows == domain]
        for name, other in t.models.items():  # each bf16 teacher
            want = _score(other, tokens)
            diff = np.abs(got[rows == domain] - np.asarray(want)) * mask
            if name == domain:
                assert diff.max() < 1e-3, (domain, diff.max())
            else:
                assert diff.max() > 0.5, (domain, name, diff.max())


def test_missing_or_extra_teacher_and_tokenizer_mismatch(teachers, tmp_path):
    path = teachers["reversal"][0]
    c = _config({"reversal": path, "addition": ""})
    with pytest.raises(ValueError, match="no teacher for domain 'addition'"):
        mopd.run(c, str(tmp_path / "run"))
    c = _config({"reversal": path, "addition": path, "chess": path})
    with pytest.raises(ValueError, match=r"names domains \['chess'\]"):
        mopd.run(c, str(tmp_path / "run"))
    other_tok = tmp_path / "bpe_teacher"
    cfg = teachers["reversal"][1].cfg
    _save_workdir(other_tok, cfg, seed=1)
    write_tokenizer_dir(other_tok, ["rev 123= 321", "17+25=42"])
    c = _config({"reversal": path, "addition": str(other_tok)})
    mesh = sh.use_mesh(sh.make_mesh(c.mesh.shape), c.mesh.rules)
    with mesh, pytest.raises(ValueError, match="config.mopd.teachers.addition=.*tokenizer"):
        mopd.Teachers(c, policy.mixture_from_config(c), ByteTokenizer(), init_from="")


def _exact_reverse_kl(student, teacher, prompts):
    """Mean over prompts of KL(student || teacher) of the first response token, over the whole
    vocabulary (no sampling noise)."""
    ids, lengths = rollout.encode_prompts(ByteTokenizer(), prompts, rollout.PROMPT_LEN)
    last = (np.arange(len(prompts)), lengths - 1)
    p = jax.nn.log_softmax(student(ids, mtp=False).logits[last], axis=-1)
    q = jax.nn.log_softmax(teacher(ids, mtp=False).logits[last], axis=-1)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


def test_mopd_lowers_reverse_kl_to_a_fixed_teacher(teachers, tmp_path):
    """Pure distillation (alpha = 0) towards fixed random teachers: the exact reverse KL of the
    first response token on held-out prompts falls for each domain (by 32% and 5% here: the
    smaller teacher's distribution is the harder one to reach) and by >10% on average."""
    c = _config(
        {d: path for d, (path, _) in teachers.items()}, lr=1e-2, warmup_steps=0, steps=30,
        prompts_per_step=16, group_size=4,
    )  # fmt: skip
    c.mopd.alpha = 0.0
    run = tmp_path / "run"
    mopd.run(c, str(run))
    before, after = checkpoint.load_model(str(run / "sft")), checkpoint.load_model(str(run))
    mixture = policy.mixture_from_config(c)
    kl = {}
    for domain, (_, teacher) in teachers.items():
        prompts = mixture.task(domain).heldout_prompts(32)
        kl[domain] = [_exact_reverse_kl(m, teacher, prompts) for m in (before, after)]
    kl0, kl1 = np.array(list(kl.values())).T
    assert np.all(kl1 < kl0) and kl1.mean() < 0.9 * kl0.mean(), kl


def test_mopd_resume_follows_the_uninterrupted_run(teachers, tmp_path):
    c = _config({d: path for d, (path, _) in teachers.items()})
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    mopd.run(c, full)
    c.rl.steps = 2
    mopd.run(c, part)
    c.rl.steps = 4
    mopd.run(c, part)
    a, b = _metrics(full), _metrics(part)
    for s in (1, 2, 3, 4):
        for k in ("reward_mean", "loss", "reverse_kl", "reverse_kl_addition", "masked_share",
                  "masked_share_addition"):  # fmt: skip
            np.testing.assert_allclose(b[s][k], a[s][k], atol=1e-6, rtol=0, err_msg=f"{k}@{s}")
    assert "heldout_success_reversal" in b[4] and "teacher_share" in b[4]
    pa = nnx.state(checkpoint.load_model(full), nnx.Param)
    pb = nnx.state(checkpoint.load_model(part), nnx.Param)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


def test_a_prompt_file_domain_learns_from_its_teacher_only(teachers, tmp_path):
    """A domain of JSONL prompts (no verifier): its rows get reward 0 (tied groups, no outcome
    advantage), its teacher still scores them, and held-out success covers the other domain."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}="}) for a in range(60)) + "\n")
    c = _config({d: p for d, (p, _) in teachers.items()}, steps=2)
    c.domains.addition.task = "jsonl"
    c.domains.addition.options = {"path": str(path), "response_bytes": 4}
    c.sft.data = str(tmp_path / "sft.jsonl")  # the warm-up: reversal examples only
    rows = mopd_tiny.get_config("teacher_reversal")
    task = policy.task_from_config(rows)
    (tmp_path / "sft.jsonl").write_text(
        "\n".join(json.dumps(r) for r in task.sft_examples(0, 16)) + "\n"
    )
    mopd.run(c, str(tmp_path / "run"))
    last = _metrics(str(tmp_path / "run"))[2]
    assert last["reward_addition"] == 0.0 and np.isfinite(last["reverse_kl_addition"])
    assert "heldout_success_reversal" in last and "heldout_success_addition" not in last


def test_masked_share_per_domain():
    """``masked_share_<domain>`` counts eq. 8's dropped tokens over that domain's rows only: rows
    whose rollout log-probs match the training forward keep every token, rows whose rollout
    engine put e^3 times less mass on its tokens (ratio outside [0.5, 2]) drop them all."""
    c = _config({"reversal": "self", "addition": "self"}, routing_replay=False)
    cfg = train.model_config(c)
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 256, (4, 12)).astype(np.int32)
    mask = np.zeros((4, 11), np.float32)
    mask[:, 5:] = 1.0
    batch = {"tokens": tokens, "mask": mask, "advantages": np.zeros(4, np.float32)}
    logp = np.asarray(rl_step.make_logp_fn(SAMPLING, replay=False)(model, batch))
    domain = np.array([0, 1, 1, 0], np.int32)  # reversal, addition (c.domains is sorted)
    batch.update(
        domain=domain, teacher_logp=logp,
        rollout_logp=np.where(domain[:, None] == 1, logp - 3.0, logp).astype(np.float32),
    )  # fmt: skip
    loss_fn = rl_step.make_loss_fn(cfg, c.rl, SAMPLING, c.mopd, domains=("reversal", "addition"))
    _, (metrics, _) = loss_fn(model, batch)
    assert float(metrics["masked_share_reversal"]) == 0.0
    assert float(metrics["masked_share_addition"]) == 1.0
    np.testing.assert_allclose(float(metrics["masked_share"]), 0.5, rtol=1e-6)
