"""Every full-size configuration a notebook uses is built and validated, without running it.

The notebook tests (tests/test_notebooks.py) run each notebook small; a full-size setting that
the library refuses would only show in a user's run. Here each ``notebooks/sizes.py`` function
is called with ``small=False`` and its result goes through the checks the notebook's run would
meet: the ModelConfig validation, the learning-rate schedule's warmup/hold check, the mesh against
the 8 CPU devices of tests/conftest.py, the batch against the mesh's batch shards, and the
abstract model, optimizer and jitted step (``jax.eval_shape``: traced, nothing computed). The
small sizes go through the same checks, so the two modes cannot drift apart unnoticed.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mimo_jax
from bench import attention as attention_bench
from configs import mopd_tiny, rl_tiny, tiny
from mimo_jax import axes, layout, train
from mimo_jax import sharding as sh
from mimo_jax.post_training import mopd, policy, rl, rollout, sft
from notebooks import sizes
from pallas_kernels import IMPLEMENTATIONS, attention

SIZES = [pytest.param(False, id="full"), pytest.param(True, id="small")]


def _abstract_run(config, shardings_under_mesh=None):
    """Validates ``config`` and traces one training step of it; returns the abstract model.

    Args:
      config: a notebook's config (model, data, train).
      shardings_under_mesh: (mesh, preset) when the notebook trains sharded, else None.

    Returns:
      The abstract (model, optimizer).
    """
    cfg = train.model_config(config)  # ModelConfig validation
    tc = config.train
    train.learning_rate_schedule(tc)  # warmup_steps + hold_steps < steps
    assert tc.seq_len <= cfg.max_position_embeddings

    def build():
        model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(config.seed))
        return model, train.make_optimizer(model, tc)

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    tokens = jax.ShapeDtypeStruct((1, tc.batch_size, tc.seq_len + 1), jnp.int32)  # [A, B, T + 1]
    if shardings_under_mesh is None:
        step = train.make_train_step(graphdef, cfg, tc)
        _, metrics = jax.eval_shape(step, state, tokens)
    else:
        mesh, preset = shardings_under_mesh
        with sh.use_mesh(mesh, preset):
            sh.check_divisible(state, mesh)  # what create_sharded refuses
            step = train.make_train_step(graphdef, cfg, tc, sh.state_shardings(abstract))
            _, metrics = jax.eval_shape(step, state, tokens)
    assert metrics["ce"].shape == ()
    return abstract


@pytest.mark.parametrize("small", SIZES)
def test_quickstart(small):
    config = sizes.quickstart(small)
    _abstract_run(config)


def test_quickstart_full_size_is_the_tiny_model():
    """The full-size quickstart trains the embedded default model, not a cut-down one."""
    assert sizes.quickstart(False).model.to_dict() == tiny.get_config().model.to_dict()


def test_a_hold_longer_than_the_run_is_caught():
    """A shortened run that keeps the tiny recipe's hold (1400 of 2800 steps) is refused here."""
    config = sizes.quickstart(False)
    config.train.hold_steps = tiny.get_config().train.hold_steps
    with pytest.raises(ValueError, match="hold_steps=1400 must be >= 0 and leave steps to decay"):
        _abstract_run(config)


@pytest.mark.parametrize("small", SIZES)
def test_conversion(small):
    window, seq = sizes.conversion(small)
    assert 0 < window < seq  # positions past the window are compared too


@pytest.mark.parametrize("small", SIZES)
def test_kernels(small):
    seq, flags = sizes.kernels(small)
    # The kernels-vs-reference cell: every implementation traced with its gradient, GQA 4 / 2.
    q = jax.ShapeDtypeStruct((1, seq, 4, 64), jnp.float32)  # [B, T, N, H]
    k = jax.ShapeDtypeStruct((1, seq, 2, 64), jnp.float32)  # [B, S, K, H]
    v = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)  # [B, S, K, P]
    sinks = jax.ShapeDtypeStruct((4,), jnp.float32)  # [N]
    for impl in IMPLEMENTATIONS:

        def loss(q, k, v, s, impl=impl):
            out = attention(q, k, v, sinks=s, sliding_window=17, implementation=impl)
            return jnp.sum(out**2)

        grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, sinks)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, sinks.shape]

    # The timing sweep: its flags parse, write no JSON, and trace at every T for both modes.
    args = attention_bench.parse_args(flags)
    assert args.out == ""
    seqs = [int(t) for t in args.seqs.split(",")]
    assert seqs == sorted(seqs) and seqs[0] > args.window
    for t in seqs:
        inputs = attention_bench.make_inputs(args, t)  # q, k, v, sinks
        for window in (args.window, None):
            grads = jax.eval_shape(attention_bench.make_step(args, window), *inputs)
            assert [g.shape for g in grads] == [x.shape for x in inputs]


@pytest.mark.parametrize("small", SIZES)
def test_sharding(small):
    config = sizes.sharding(small)
    shape = tuple(config.mesh.shape)
    assert math.prod(shape) == 8 == jax.device_count()  # the notebook fakes 8 CPU devices
    mesh = sh.make_mesh(shape)
    preset = config.mesh.rules
    with sh.use_mesh(mesh, preset):
        shards = math.prod(mesh.shape[a] for a in axes.mesh_axes(axes.BATCH))
    assert config.train.batch_size % shards == 0
    abstract = _abstract_run(config, (mesh, preset))
    # The layout table and picture cover every preset; each must divide the model's dims.
    model, _ = abstract
    for name in sh.RULES:
        assert layout.param_bytes_per_device(model, shape, name) > 0
    # The tp_ep picture names these parameters.
    paths = {lay.path for lay in layout.describe_shardings(model, mesh, "tp_ep")}
    assert {"layers.1.mlp.wi_gate", "layers.0.self_attn.q_proj.kernel"} <= paths


@pytest.mark.parametrize("small", SIZES)
def test_checkpoint_on_a_mesh(small):
    cfg, max_new_tokens = sizes.checkpoint_on_a_mesh(small)
    assert max_new_tokens > 0
    assert cfg.vocab_size >= 400  # the notebook's tokenizer (synthetic_checkpoint.write_tokenizer)
    assert cfg.embed_dim % 128  # ragged FP8 blocks
    assert cfg.num_mtp_layers >= 1  # MTP tensors in the checkpoint
    abstract = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    assert jax.device_count() == 8  # the notebook fakes 8 CPU devices
    mesh = sh.make_mesh((1, 2, 2, 2))
    with sh.use_mesh(mesh, "decode"):
        sh.check_divisible(nnx.state(abstract), mesh)  # what load_hf refuses
    # The picture of one expert weight: split over the experts and the expert FFN.
    wi = next(
        lay
        for lay in layout.describe_shardings(abstract, (1, 2, 2, 2), "decode")
        if lay.path.endswith("mlp.wi_gate")
    )
    assert math.prod(wi.shape) == 8 * math.prod(wi.shard_shape)


def _check_post_training(config):
    """The SFT warm-up's and the RL run's checks, as ``sft.run`` and ``rl.run`` make them."""
    cfg, tc = train.model_config(config), config.train
    policy.mixture_from_config(config)  # config.domains, else config.task
    train.learning_rate_schedule(tc)  # the SFT warm-up
    sft.check_config(config, cfg)
    train.learning_rate_schedule(rl._optimizer_fields(config.rl))
    mesh = sh.make_mesh(config.mesh.shape)
    with sh.use_mesh(mesh, config.mesh.rules):
        train.check_batch_shards(config, mesh)
        rl.check_config(config, cfg)
    assert config.train.seq_len <= cfg.max_position_embeddings
    assert rollout.PROMPT_LEN + config.rl.max_new_tokens <= cfg.max_position_embeddings
    assert "sparse" in cfg.mlp_layer_types  # routing replay has experts to replay
    # The SFT warm-up's step, traced on its first batch.
    dataset, _ = sft.load_dataset(
        config, mimo_jax.data.load_tokenizer(config.data.tokenizer or None)
    )
    batch = sft.host_batch(dataset, config, 0, cfg.num_mtp_layers)  # [A, B, T] leaves
    abstract = nnx.eval_shape(
        lambda: (m := mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), train.make_optimizer(m, tc))
    )
    graphdef, state = nnx.split(abstract)
    loss_fn = sft.make_loss_fn(cfg, tc, packing=config.sft.packing)
    step = train.make_train_step(graphdef, cfg, tc, loss_fn=loss_fn)
    _, metrics = jax.eval_shape(step, state, batch)
    assert metrics["ce"].shape == ()


@pytest.mark.parametrize("small", SIZES)
def test_post_training(small):
    _check_post_training(sizes.post_training(small))


def test_post_training_full_size_is_the_shipped_config():
    """The full-size notebook runs configs/rl_tiny.py as ``main.py --mode=rl`` would."""
    assert sizes.post_training(False).to_dict() == rl_tiny.get_config().to_dict()


@pytest.mark.parametrize("small", SIZES)
def test_mopd(small):
    """Both teachers' RL runs, the student's SFT and its MOPD run, as their ``run``s check them."""
    *teachers, student = sizes.mopd(small)
    for config in (*teachers, student):
        _check_post_training(config)
    # The notebook pairs the domains with the teachers in this order: same task, same options
    # (so a teacher's held-out prompts are its domain's).
    for domain, teacher in zip(("reversal", "addition"), teachers, strict=True):
        entry = student.domains[domain]
        assert (teacher.task.name, teacher.task.options.to_dict()) == (
            entry.task,
            entry.options.to_dict(),
        )
    mopd.check_config(student, policy.mixture_from_config(student))  # the teachers' paths aside


def test_mopd_full_size_is_the_shipped_configs():
    """The full-size notebook runs configs/mopd_tiny.py as the README's commands would."""
    shipped = [mopd_tiny.get_config(a) for a in ("teacher_reversal", "teacher_addition", "student")]
    assert [c.to_dict() for c in sizes.mopd(False)] == [c.to_dict() for c in shipped]
