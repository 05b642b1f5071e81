"""The notebooks run top to bottom, headless, in small mode, and draw their figures.

Each notebook is executed with nbclient in a fresh ``python3`` kernel started in ``notebooks/``
(as Jupyter would) with the repository root on ``PYTHONPATH`` (so the setup cell finds this
checkout and installs nothing), ``MIMO_NOTEBOOK_SMALL=1`` (tiny sizes) and ``MIMO_NOTEBOOK_OUT``
pointing at a temporary directory, where every figure must appear, and
``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` to cut compile time. The notebooks are committed without
outputs and with their full-size run time in the first cell; a test keeps them that way. The
figure functions (``notebooks/figures.py``) are also drawn directly. The full-size configurations
are validated in tests/test_notebook_configs.py.
"""

import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from notebooks import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")

# notebook -> the figures (file stems) it must write.
NOTEBOOKS = {
    "01_quickstart.ipynb": ["01_loss", "01_acceptance"],
    "02_huggingface_conversion.ipynb": ["02_logit_diff"],
    "03_attention_kernels.ipynb": ["03_mask", "03_sink", "03_timing"],
    "04_sharding.ipynb": ["04_shardings", "04_memory"],
    "05_checkpoint_on_a_mesh.ipynb": ["05_expert_shards"],
    "06_post_training.ipynb": ["06_reward", "06_r3"],
    "07_mopd.ipynb": ["07_domains"],
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def test_every_notebook_is_listed_and_clean():
    found = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS), f"notebooks {found} vs tested {sorted(NOTEBOOKS)}"
    for name in found:
        nb = _read(name)
        nbformat.validate(nb)
        # The full-size run time is stated up front (docs/notebooks.md: how it was measured).
        assert "Runs top to bottom in about" in nb.cells[0].source, f"{name}: no run time"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{name} cell {i} has outputs: commit notebooks cleared"
                )


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MIMO_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Halves XLA compile time, most of a notebook's run time at small sizes. Nothing here reads
    # the numbers (03's timing plot only has to be drawn); users run with full optimisation.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    nb = _read(name)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error

    # The setup cell used this checkout (it would have cloned and installed otherwise).
    setup_out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"mimo_jax from {os.path.join(ROOT, 'mimo_jax')}" in setup_out, setup_out
    for stem in NOTEBOOKS[name]:
        path = tmp_path / f"{stem}.png"
        assert path.is_file() and path.stat().st_size > 1000, f"{name} did not write {path}"
    # Every figure that was saved was also displayed as an image.
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= len(NOTEBOOKS[name]), f"{name}: {images} images displayed"


def test_figure_functions(tmp_path, monkeypatch):
    """Each figure function draws from plain arrays; saving honours MIMO_NOTEBOOK_OUT."""
    monkeypatch.setenv(figures.OUT_DIR_ENV, str(tmp_path))
    t = np.arange(1, 6)
    mask = np.tril(np.ones((8, 8), bool)) & ~np.tril(np.ones((8, 8), bool), -3)  # W = 3
    weights = np.where(mask, 0.2, 0.0)
    made = {
        "loss": figures.plot_loss_curve(t, 5.0 / t, extra={"mtp": (t, 6.0 / t)}),
        "accept": figures.plot_acceptance({0: 1.0, 2: 2.1}, {0: [], 2: [0.8, 0.3]}),
        "diff": figures.plot_logit_diff({"a": [0.0, 1e-7, 2e-7]}, window=2),
        "mask": figures.plot_attention_mask(
            {"swa": mask, "full": np.tril(np.ones((8, 8), bool))},
            block=4,
            kv_blocks={"swa": [(0, 0), (0, 1)]},
        ),
        "sink": figures.plot_sink_effect(
            {"no sink": weights / weights.sum(-1, keepdims=True), "sink": weights}
        ),
        "timing": figures.plot_timing([128, 256], {"swa": [1.0, 2.0], "full": [1.0, 4.0]}),
        "reward": figures.plot_reward_curve(t, t / 10, (t, t / 8), sft_heldout=(t, t / 20)),
        "r3": figures.plot_routing_replay(
            t, {"kl": 1e-3 / t, "share": 0 * t}, {"kl": 1e-2 / t, "share": t / 100}
        ),
        "domains": figures.plot_domain_curves(
            {"a": (t, t / 10), "b": (t, 1 - t / 10)},
            {"a": 0.6, "b": 0.9},
            {"a": (t, 1.0 / t), "b": (t, -0.1 * t)},  # a k1 estimate may be negative
        ),
    }
    for stem, fig in made.items():
        path = figures.save_figure(fig, stem)
        assert path == str(tmp_path / f"{stem}.png") and os.path.getsize(path) > 1000
        figures.show(fig)  # outside IPython: a no-op, not an error
        figures.LiveFigure().show(fig)
