"""Parameter layouts from shapes (``layout.describe_shardings`` and friends) and their figures.

Layouts are computed from shapes and rules alone; here they are checked against JAX's own
``NamedSharding.devices_indices_map`` on 8 CPU devices (tests/conftest.py), and per-device bytes
against counts written from the parameters' logical axis names. Nothing is compiled.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import mimo_jax
from configs.base import base_config
from mimo_jax import axes as ax
from mimo_jax import layout, train
from mimo_jax import sharding as sh
from notebooks import figures
from tests.test_sharding import CFG  # the tiny mesh-test model


def _abstract(cfg):
    """Abstract (model, optimizer): shapes and sharding metadata, nothing allocated."""

    def build():
        model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
        return model, train.make_optimizer(model, base_config().train)

    return nnx.eval_shape(build)


@pytest.fixture(scope="module")
def tiny():
    return _abstract(CFG)


@pytest.mark.parametrize("preset", list(sh.RULES))
@pytest.mark.parametrize("shape", [(1, 2, 2, 2), (2, 1, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_layouts_match_jax(tiny, shape, preset):
    """Every array of model and optimizer: per-device block shape and which devices hold which
    block, as JAX lays out a NamedSharding with the same spec."""
    mesh = sh.make_mesh(shape)
    position = {d.id: i for i, d in enumerate(mesh.devices.flat)}
    with sh.use_mesh(mesh, preset):  # rules from the context (preset=None), mesh from the context
        layouts = layout.describe_shardings(tiny)
    assert len(layouts) == len(nnx.to_flat_state(nnx.state(tiny))) > 60
    split = 0
    for lay in layouts:
        sharding = NamedSharding(mesh, lay.spec)
        assert lay.shard_shape == sharding.shard_shape(lay.shape), lay.path
        for device, index in sharding.devices_indices_map(lay.shape).items():
            block = tuple((s.start or 0) // b for s, b in zip(index, lay.shard_shape, strict=True))
            assert position[device.id] in lay.devices[block], (lay.path, block)
        assert lay.devices.size == mesh.size  # every device holds exactly one block
        assert lay.nbytes == math.prod(lay.shape) * lay.dtype.itemsize
        split += lay.devices.shape[-1] < mesh.size
    assert split >= 9  # at least the expert weights and their Adam moments


def _bytes_by_hand(state, split_on: dict[str, int]) -> int:
    """Per-device bytes when each logical axis in ``split_on`` is divided by its factor."""
    total = 0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        logical = var.get_metadata().get("out_sharding") or ()
        n = math.prod(split_on.get(name, 1) for name in logical)
        total += value.size * value.dtype.itemsize // n
    return total


def test_param_bytes_per_device_tiny(tiny):
    model, opt = tiny
    everything = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(tiny)))
    assert layout.param_bytes_per_device(tiny, (1, 1, 1, 1), "tp_ep") == everything
    # fsdp on 8 devices: every weight's embed dim / 8, the rest (norms, sinks, biases) replicated.
    want = _bytes_by_hand(nnx.state(model), {ax.EMBED: 8, ax.EXPERT_EMBED: 8})
    assert layout.param_bytes_per_device(model, (1, 8, 1, 1), "fsdp") == want
    # The mesh and rules may come from the context; Adam moments are laid out like the weights.
    with sh.use_mesh(sh.make_mesh((1, 8, 1, 1)), "fsdp"):
        assert layout.param_bytes_per_device(model) == want
        adam = layout.param_bytes_per_device(opt)
    scalars = sum(x.dtype.itemsize for x in jax.tree.leaves(nnx.state(opt)) if x.ndim == 0)
    weights = _bytes_by_hand(nnx.state(model, nnx.Param), {ax.EMBED: 8, ax.EXPERT_EMBED: 8})
    assert adam == 2 * weights + scalars  # mu, nu (like the Params), and the step counts
    # tp_ep on (data 2, fsdp 2, expert 2, tensor 2): a dict mesh shape works too.
    want = _bytes_by_hand(
        nnx.state(model),
        {ax.EMBED: 2, ax.EXPERT_EMBED: 2, ax.EXPERT: 2, ax.HEADS: 2, ax.KV_HEADS: 2,
         ax.MLP: 2, ax.MOE_MLP: 2, ax.VOCAB: 2},
    )  # fmt: skip
    mesh = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 2}
    assert layout.param_bytes_per_device(model, mesh, "tp_ep") == want


def test_param_bytes_per_device_real_model():
    """The released config: decode on one 8-device node keeps experts / 8, the rest whole."""
    model, opt = _abstract(mimo_jax.mimo_v2_flash())
    params = nnx.state(model)
    experts = sum(
        v.get_value().size * v.get_value().dtype.itemsize
        for _, v in nnx.to_flat_state(params)
        if ax.EXPERT in (v.get_metadata().get("out_sharding") or ())
    )
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert experts > 0.95 * total  # 256 experts x 47 MoE layers are almost all of MiMo
    got = layout.param_bytes_per_device(params, (1, 1, 8, 1), "decode")
    assert got == total - experts + experts // 8
    # fsdp_ep on 256 devices: experts / 16 and their embed / 16, other weights' embed / 256.
    got = layout.param_bytes_per_device(params, (1, 16, 16, 1), "fsdp_ep")
    assert got == _bytes_by_hand(params, {ax.EMBED: 256, ax.EXPERT: 16, ax.EXPERT_EMBED: 16})
    assert got < total / 250  # only norms, sinks and router biases are replicated
    # Global layers have 4 kv heads: tensor = 16 is refused, naming the parameter.
    with pytest.raises(ValueError, match=r"k_proj.*\('kv_heads', size 4\).*\('tensor',\)"):
        layout.param_bytes_per_device(params, (1, 1, 16, 16), "tp_ep")


def test_indivisible_dims_strict_and_padded(tiny):
    model, _ = tiny
    mesh = (1, 1, 1, 4)  # kv heads (2) over tensor = 4
    with pytest.raises(ValueError, match=r"k_proj.*'kv_heads', size 2"):
        layout.param_bytes_per_device(model, mesh, "tp_ep")
    padded = layout.param_bytes_per_device(model, mesh, "tp_ep", strict=False)
    k_proj = next(
        lay
        for lay in layout.describe_shardings(model, mesh, "tp_ep")
        if lay.path == "layers.0.self_attn.k_proj.kernel"
    )
    assert k_proj.shape == (32, 2, 24) and k_proj.shard_shape == (32, 1, 24)  # ceil(2 / 4)
    assert k_proj.devices.shape == (1, 4, 1, 1)  # 4 blocks along kv_heads, one device each
    assert padded > layout.param_bytes_per_device(model, (1, 1, 1, 2), "tp_ep") / 2


def test_shapes_and_devices_by_hand():
    spec = PartitionSpec(("fsdp", "expert"), None, "tensor")
    mesh = (1, 2, 2, 2)
    assert layout.shard_shape((8, 3, 6), spec, mesh) == (2, 3, 3)
    assert layout.shard_shape((7,), PartitionSpec("fsdp"), mesh) == (4,)  # ceil: padded
    devices = layout.block_devices(3, spec, mesh)  # [4, 1, 2, R = 1]
    assert devices.shape == (4, 1, 2, 1)
    # Position = fsdp * 4 + expert * 2 + tensor; block along dim 0 = fsdp * 2 + expert.
    np.testing.assert_array_equal(devices[:, 0, :, 0], [[0, 1], [2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(layout.block_devices(0, None, mesh), np.arange(8))  # scalar
    np.testing.assert_array_equal(layout.block_devices(1, PartitionSpec("tensor"), mesh),
                                  [[0, 2, 4, 6], [1, 3, 5, 7]])  # fmt: skip


def test_errors():
    model = _abstract(CFG)[0]
    with pytest.raises(ValueError, match="no sharding rules"):
        layout.describe_shardings(model, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="no mesh given"):
        layout.describe_shardings(model, preset="fsdp")
    with pytest.raises(ValueError, match="4 positive sizes"):
        layout.shard_shape((4,), None, (2, 2))
    with pytest.raises(ValueError, match="lacks the axes"):
        layout.shard_shape((4,), None, {"fsdp": 2})
    with pytest.raises(ValueError, match="more entries"):
        layout.shard_shape((4,), PartitionSpec("fsdp", None), (1, 2, 1, 1))


def test_format_layouts(tiny):
    model, _ = tiny
    mesh = (1, 2, 2, 2)
    layouts = {p: layout.describe_shardings(model, mesh, p) for p in ("fsdp_ep", "tp_ep")}
    table = layout.format_layouts(layouts, ["scanned.0.mlp.wi_gate", "norm.scale"])
    lines = table.splitlines()
    assert len(lines) == 4 and "fsdp_ep" in lines[0] and "tp_ep" in lines[0]
    assert lines[2].split() == ["scanned.0.mlp.wi_gate", "2x8x32x16", "(-,", "e,", "f+t,", "-)",
                                "2x4x8x16", "(-,", "e,", "f,", "t)", "2x4x16x8"]  # fmt: skip
    assert lines[3].split() == ["norm.scale", "32", "(-)", "32", "(-)", "32"]
    assert len(layout.format_layouts(layouts).splitlines()) == 2 + len(layouts["tp_ep"])
    with pytest.raises(ValueError, match="no parameters"):
        layout.format_layouts(layouts, ["nope"])


def test_sharding_figures(tiny, tmp_path):
    model, _ = tiny
    mesh = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    layouts = {lay.path: lay for lay in layout.describe_shardings(model, mesh, "tp_ep")}
    shown = ["embed_tokens.embedding", "scanned.0.mlp.wi_gate", "norm.scale"]
    fig = figures.plot_param_shardings([layouts[p] for p in shown], mesh, ncols=2)
    mesh_ax, emb_ax, wi_ax, norm_ax = fig.axes
    cells = lambda ax: sorted(t.get_text() for t in ax.texts)  # noqa: E731
    assert len(mesh_ax.texts) == 8
    # Embedding: vocab over tensor, embed over fsdp, replicated over expert.
    assert cells(emb_ax) == ["0 2", "1 3", "4 6", "5 7"]
    assert cells(wi_ax) == [str(i) for i in range(8)]  # split three ways: one device per block
    assert cells(norm_ax) == ["all 8"]
    assert "scanned.0.mlp.wi_gate" in wi_ax.get_title()
    path = figures.save_figure(fig, "shardings", str(tmp_path))
    assert path == str(tmp_path / "shardings.png") and (tmp_path / "shardings.png").stat().st_size

    plans = {"a": {"parameters": 2e9, "Adam moments": 4e9}, "b": {"parameters": 9e10}}
    fig = figures.plot_memory_plan(plans, capacity_bytes=141e9, capacity_label="H200")
    (ax,) = fig.axes
    assert sorted(t.get_text().strip() for t in ax.texts) == ["6.0 GB", "90.0 GB"]
    path = figures.save_figure(fig, "memory", str(tmp_path))
    assert path == str(tmp_path / "memory.png") and (tmp_path / "memory.png").stat().st_size
