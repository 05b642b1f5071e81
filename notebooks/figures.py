"""Figures for the notebooks: each function takes data in and returns a matplotlib Figure.

The notebooks compute nothing themselves: they call the library, pass the numbers to one of these
functions, and save the result with ``save_figure``. Tests call the same functions, so a figure
that a notebook shows is a figure that CI has drawn. This module lives beside the notebooks, not
in ``mimo_jax``, so the library does not depend on matplotlib (it is in ``requirements-dev.txt``;
Colab ships it).

Every plot uses the object-oriented API on a fresh ``Figure`` (no pyplot state), so drawing works
headless and figures never accumulate in a global registry. IPython is imported only to display,
so scripts can draw and save without it.

Sections: saving and live display; training; decoding; conversion; attention; sharding. New
notebooks add a section with the same conventions: data in, Figure out.
"""

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Environment variable naming the directory that ``save_figure`` writes to (the notebook tests
# point it at a temporary directory); unset means the current directory.
OUT_DIR_ENV = "MIMO_NOTEBOOK_OUT"


def _figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0):
    """A new Figure with ``ncols`` side-by-side axes (a list), detached from pyplot."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


# ---------------------------------------------------------------------------------------------
# Saving and live display.


def save_figure(fig: Any, name: str, out_dir: str | None = None) -> str:
    """Writes ``fig`` as ``<out_dir>/<name>.png``.

    Args:
      fig: a matplotlib Figure.
      name: file name without extension.
      out_dir: target directory; default ``$MIMO_NOTEBOOK_OUT``, else the current directory
        (the notebook's own directory under Jupyter, ``/content`` on Colab).

    Returns:
      The path written.
    """
    out_dir = out_dir or os.environ.get(OUT_DIR_ENV) or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _png(fig: Any):
    """``fig`` as an IPython PNG image, or None outside IPython.

    A rendered image rather than the Figure itself: a bare Figure only displays as a picture
    when a matplotlib backend has registered IPython formatters, which headless runs lack.
    """
    try:
        from IPython import get_ipython  # noqa: PLC0415
        from IPython.display import Image  # noqa: PLC0415
    except ImportError:
        return None
    if get_ipython() is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


def show(fig: Any) -> None:
    """Displays ``fig`` in a notebook; does nothing outside IPython.

    Args:
      fig: a matplotlib Figure.
    """
    if (img := _png(fig)) is not None:
        from IPython.display import display  # noqa: PLC0415

        display(img)


class LiveFigure:
    """One notebook output that is redrawn in place, e.g. a loss curve during training.

    ``show(fig)`` displays the first figure and replaces it on later calls (an IPython display
    handle); outside IPython it does nothing, so scripts may call it freely.
    """

    def __init__(self):
        self._handle = None

    def show(self, fig: Any) -> None:
        """Displays ``fig``, replacing what this object showed before.

        Args:
          fig: a matplotlib Figure.
        """
        if (img := _png(fig)) is None:
            return
        if self._handle is None:
            from IPython.display import display  # noqa: PLC0415

            self._handle = display(img, display_id=True)
        else:
            self._handle.update(img)


# ---------------------------------------------------------------------------------------------
# Training.


def plot_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    extra: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    title: str = "training loss",
) -> Any:
    """Loss against step.

    Args:
      steps: [n] optimizer steps.
      losses: [n] main-model cross-entropy (nats/token) at those steps.
      extra: further curves by label, each (steps, values), e.g. per-depth MTP losses.
      title: axes title.

    Returns:
      The Figure.
    """
    fig, (ax,) = _figure()
    ax.plot(steps, losses, label="loss", lw=2)
    for label, (s, v) in (extra or {}).items():
        ax.plot(s, v, label=label, lw=1, alpha=0.8)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------
# Decoding.


def plot_acceptance(
    mean_accepted: Mapping[int, float], acceptance: Mapping[int, Sequence[float]]
) -> Any:
    """Speculative-decoding statistics per number of MTP drafts.

    Args:
      mean_accepted: draft count d -> mean tokens committed per verify step (1 for d = 0).
      acceptance: draft count d -> [d] share of verify steps in which draft k was accepted
        (``GenerateResult.acceptance_rate``).

    Returns:
      The Figure: mean accepted length per d (left), per-depth acceptance per d (right).
    """
    fig, (left, right) = _figure(2, width=5.0)
    ds = sorted(mean_accepted)
    left.bar([str(d) for d in ds], [mean_accepted[d] for d in ds], color="tab:blue")
    left.plot([-0.5, len(ds) - 0.5], [1, 1], "k--", lw=1, label="plain decoding")
    left.set(xlabel="draft tokens d", ylabel="tokens per verify step", title="mean accepted length")
    left.legend()
    for d in sorted(acceptance):
        rates = list(acceptance[d])
        if rates:
            right.plot(range(1, len(rates) + 1), rates, "o-", label=f"d = {d}")
    right.set_xticks(range(1, max((len(r) for r in acceptance.values()), default=0) + 1))
    right.set(xlabel="draft depth k", ylabel="acceptance rate", ylim=(0, 1.05))
    right.set_title("share of steps whose draft k was accepted")
    right.grid(alpha=0.3)
    if right.lines:
        right.legend()
    return fig


# ---------------------------------------------------------------------------------------------
# Conversion.


def plot_logit_diff(diffs: Mapping[str, Sequence[float]], *, window: int | None = None) -> Any:
    """Per-position max |logit difference| between two implementations (log scale).

    Args:
      diffs: label -> [T] max over batch and vocabulary of |ours - theirs| at each position.
      window: the sliding window, marked with a vertical line (positions beyond it are where a
        window bug would first show).

    Returns:
      The Figure.
    """
    fig, (ax,) = _figure(width=7.0)
    # Distinct line styles and marker sizes, so curves that coincide stay visible.
    for i, (label, d) in enumerate(diffs.items()):
        d = np.asarray(d, np.float64)
        # Exact zeros (bit-identical positions) have no logarithm; floor them for display only.
        style = ("o-", "s--", "^:", "d-.")[i % 4]
        ax.semilogy(
            np.arange(len(d)), np.maximum(d, 1e-12), style, ms=6 - 1.5 * (i % 4), label=label
        )
    if window is not None:
        ax.axvline(window - 0.5, color="gray", ls="--", lw=1, label=f"window = {window}")
    ax.set(xlabel="position", ylabel="max |logit difference|", title="logits: per-position error")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------
# Attention.


def plot_attention_mask(
    masks: Mapping[str, Any],
    *,
    block: int | None = None,
    kv_blocks: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> Any:
    """Visibility masks side by side, optionally with the kernel tiles that are visited.

    Args:
      masks: label -> bool [T, S], True where query t may attend to key s
        (``pallas_kernels.reference.visibility_mask`` of one batch row).
      block: tile size of the flash kernel (square tiles), to draw the tile grid.
      kv_blocks: label -> per q block, the (first, last) kv block the kernel visits
        (``pallas_kernels.flash_common.kv_block_bounds``); those tiles are outlined.

    Returns:
      The Figure.
    """
    fig, axes = _figure(len(masks), width=4.5, height=4.5)
    for ax, (label, mask) in zip(axes, masks.items(), strict=True):
        mask = np.asarray(mask)
        t, s = mask.shape
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
        ax.set(xlabel="key position", ylabel="query position", title=label)
        if block:
            for x in range(block, s, block):
                ax.axvline(x - 0.5, color="gray", lw=0.5)
            for y in range(block, t, block):
                ax.axhline(y - 0.5, color="gray", lw=0.5)
        for qi, (lo, hi) in enumerate((kv_blocks or {}).get(label, [])):
            for kj in range(int(lo), int(hi) + 1):
                ax.add_patch(
                    Rectangle(
                        (kj * block - 0.5, qi * block - 0.5),
                        block,
                        block,
                        fill=False,
                        ec="tab:red",
                        lw=1.5,
                    )
                )
        visible = mask.sum() / mask.size
        ax.text(0.98, 0.02, f"{visible:.0%} visible", transform=ax.transAxes, ha="right")
    return fig


def plot_sink_effect(weights: Mapping[str, Any]) -> Any:
    """Attention weights of one head with and without a sink, and the mass left on real keys.

    Args:
      weights: label -> [T, S] softmax probabilities over the keys
        (``pallas_kernels.reference.attention_weights`` for one batch row and head). With a
        sink a row sums to less than one: the rest went to the sink column, which has no value.

    Returns:
      The Figure: one heatmap per entry (shared colour scale) and, last, each entry's row sums.
    """
    fig, axes = _figure(len(weights) + 1, width=4.2, height=4.0)
    arrays = {k: np.asarray(w, np.float64) for k, w in weights.items()}
    vmax = max(float(w.max()) for w in arrays.values())
    for ax, (label, w) in zip(axes, arrays.items(), strict=False):
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(xlabel="key position", ylabel="query position", title=label)
    fig.colorbar(im, ax=axes[:-1], shrink=0.8, label="attention weight")
    ax = axes[-1]
    for label, w in arrays.items():
        ax.plot(w.sum(axis=-1), "o-", ms=3, label=label)
    ax.set(xlabel="query position", ylabel="sum of weights on real keys", ylim=(0, 1.05))
    ax.set_title("1 - sum = weight on the sink")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_timing(seq_lens: Sequence[int], seconds: Mapping[str, Sequence[float]]) -> Any:
    """Time against sequence length (log-log), with linear and quadratic guides.

    Args:
      seq_lens: [n] sequence lengths T.
      seconds: label -> [n] seconds per call at each T (e.g. ``swa`` and ``full``).

    Returns:
      The Figure.
    """
    fig, (ax,) = _figure(width=6.5)
    t = np.asarray(seq_lens, np.float64)
    for label, s in seconds.items():
        ax.loglog(t, s, "o-", lw=2, label=label)
    # Guides through the first point of the first series: O(T) and O(T^2) growth.
    s0 = float(np.asarray(next(iter(seconds.values())))[0])
    ax.loglog(t, s0 * t / t[0], "k:", lw=1, label="~ T")
    ax.loglog(t, s0 * (t / t[0]) ** 2, "k--", lw=1, label="~ T^2")
    ax.set(xlabel="sequence length T", ylabel="seconds per call", title="attention time vs T")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------
# Sharding.


def _device_colors(n: int) -> Any:
    """n distinct RGBA colours, one per device (qualitative map, cycled past 20)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _device_list(ids: Sequence[int], total: int) -> str:
    """Compact label of the devices holding one block: '3', '0 4', 'all 8'."""
    ids = [int(i) for i in ids]
    if len(ids) == total and total > 1:
        return f"all {total}"
    if len(ids) <= 4:
        return " ".join(map(str, ids))
    return f"{ids[0]} {ids[1]} .. {ids[-1]} ({len(ids)})"


def plot_param_shardings(
    layouts: Sequence[Any], mesh_shape: Mapping[str, int] | None = None, *, ncols: int = 4
) -> Any:
    """Where each parameter lives: one panel per parameter, one cell per block, coloured by device.

    Dims that are split are laid out as a grid: the last split dim across, the others down
    (lexicographically, first dim major); dims that are not split are not drawn. Each cell names
    the devices (mesh positions, ``mesh.devices.flat`` order) that hold that block; a cell with
    several devices is replicated over them and takes the colour of the first.

    Args:
      layouts: ``mimo_jax.layout.ParamLayout``-like records; read are ``path``, ``shape``,
        ``logical``, ``spec``, ``shard_shape`` and ``devices`` (int [n_0, ..., n_{ndim-1}, R]: the
        mesh positions holding each block, ``mimo_jax.layout.block_devices``).
      mesh_shape: {axis: size} of the mesh; when given, a first panel shows each device's mesh
        coordinates in the same colours.
      ncols: panels per row.

    Returns:
      The Figure.
    """
    total = int(np.asarray(layouts[0].devices).size) if layouts else 1
    if mesh_shape is not None:
        total = int(np.prod(list(mesh_shape.values())))
    colors = _device_colors(total)
    n = len(layouts) + (mesh_shape is not None)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]

    def draw(ax, cells, labels, title, xlabel, ylabel):
        """cells: int [r, c] colour index per cell; labels: str [r, c]."""
        r, c = cells.shape
        ax.imshow(np.asarray([[colors[i] for i in row] for row in cells]), aspect="auto")
        for i in range(r):
            for j in range(c):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
        for x in range(1, c):
            ax.axvline(x - 0.5, color="white", lw=2)
        for y in range(1, r):
            ax.axhline(y - 0.5, color="white", lw=2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)

    if mesh_shape is not None:
        names, sizes = list(mesh_shape), [int(s) for s in mesh_shape.values()]
        half = len(names) // 2  # rows: the first half of the axes; columns: the second
        r, c = int(np.prod(sizes[:half])), int(np.prod(sizes[half:]))
        pos = np.arange(total).reshape(r, c)
        coords = np.stack(np.unravel_index(np.arange(total), sizes), -1)  # [devices, axes]
        labels = [[f"{p}\n" + ",".join(map(str, coords[p])) for p in row] for row in pos]
        shape = " x ".join(f"{a} {s}" for a, s in zip(names, sizes, strict=True))
        draw(axes[0], pos, labels, f"mesh: {shape}\ndevice / coordinates",
             " x ".join(names[half:]), " x ".join(names[:half]))  # fmt: skip

    for ax, lay in zip(axes[n - len(layouts) :], layouts, strict=True):
        devices = np.asarray(lay.devices)  # [n_0, ..., n_{k-1}, R]
        counts = devices.shape[:-1]
        split = [d for d, k in enumerate(counts) if k > 1]
        if len(split) > 1:
            rows, cols = split[:-1], split[-1:]
        elif split and split[0] == len(counts) - 1 and len(counts) > 1:
            rows, cols = [], split  # only the last dim is split: lay it across
        else:
            rows, cols = split, []
        # Drop the unsplit dims (one block each); the split ones keep their order, rows first.
        grid = devices[tuple(slice(None) if d in split else 0 for d in range(len(counts)))]
        grid = grid.reshape(
            int(np.prod([counts[d] for d in rows])), int(np.prod([counts[d] for d in cols])), -1
        )  # [r, c, R]
        labels = [[_device_list(ids, total) for ids in row] for row in grid]
        logical = list(lay.logical) + [None] * (len(lay.shape) - len(lay.logical))

        def dims(ds, logical=logical, counts=counts):
            return " x ".join(f"{logical[d] or f'dim {d}'} / {counts[d]}" for d in ds)

        shapes = f"{list(lay.shape)} -> {list(lay.shard_shape)} per device"
        draw(ax, grid[..., 0], labels, f"{lay.path}\n{shapes}\n{lay.spec}", dims(cols), dims(rows))
    return fig


def plot_memory_plan(
    plans: Mapping[str, Mapping[str, float]],
    *,
    capacity_bytes: float | None = None,
    capacity_label: str = "device memory",
) -> Any:
    """Bytes per device of each (mesh, preset) plan, stacked by component.

    Args:
      plans: plan label -> {component: bytes per device}, e.g. parameters, gradients, Adam
        moments (``mimo_jax.layout.param_bytes_per_device``).
      capacity_bytes: a device's memory, drawn as a vertical line.
      capacity_label: legend label of that line.

    Returns:
      The Figure: one horizontal stacked bar per plan, in GB (1e9 bytes).
    """
    fig, (ax,) = _figure(width=8.0, height=1.0 + 0.6 * len(plans))
    labels = list(plans)[::-1]  # first plan on top
    components = list(dict.fromkeys(c for p in plans.values() for c in p))
    left = np.zeros(len(labels))
    for comp in components:
        gb = np.array([plans[lab].get(comp, 0.0) / 1e9 for lab in labels])
        ax.barh(labels, gb, left=left, label=comp)
        left += gb
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f} GB", va="center", fontsize=9)
    if capacity_bytes is not None:
        ax.axvline(capacity_bytes / 1e9, color="k", ls="--", lw=1, label=capacity_label)
    ax.set(xlabel="GB per device", title="memory per device")
    ax.set_xlim(0, max(float(left.max(initial=0)), (capacity_bytes or 0) / 1e9) * 1.25 or 1)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Post-training.


def plot_reward_curve(
    rl_steps: Sequence[int],
    reward_mean: Sequence[float],
    heldout: tuple[Sequence[int], Sequence[float]],
    *,
    sft_heldout: tuple[Sequence[int], Sequence[float]] | None = None,
) -> Any:
    """The RL reward curve, with held-out success before (SFT) and during RL.

    Args:
      rl_steps: [n] RL steps at which the mean reward was logged.
      reward_mean: [n] mean verifier reward of that step's rollouts.
      heldout: (steps, success) of the RL run: greedy held-out success rate (step 0 = the
        policy RL starts from).
      sft_heldout: (steps, success) of the SFT warm-up, drawn in a left panel; None: no panel.

    Returns:
      The Figure: SFT held-out success against SFT step (left, if given), mean reward and
      held-out success against RL step (right), both on a 0..1 scale.
    """
    fig, axes = _figure(1 if sft_heldout is None else 2, width=5.0)
    if sft_heldout is not None:
        ax = axes[0]
        ax.plot(*sft_heldout, "o-", color="tab:green", label="held-out success")
        ax.set(xlabel="SFT step", title="SFT warm-up")
    ax = axes[-1]
    ax.plot(rl_steps, reward_mean, color="tab:blue", alpha=0.8, label="mean reward (rollouts)")
    ax.plot(*heldout, "o-", color="tab:green", label="held-out success (greedy)")
    ax.set(xlabel="RL step", title="RL (GRPO)")
    axes[0].set_ylabel("success rate / reward")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_routing_replay(
    steps: Sequence[int],
    replay: Mapping[str, Sequence[float]],
    no_replay: Mapping[str, Sequence[float]],
) -> Any:
    """Train-inference mismatch with and without rollout routing replay, one panel per metric.

    Args:
      steps: [n] RL steps at which the mismatch was probed.
      replay: metric label -> [n] values with the rollout's experts replayed in the training
        forward (e.g. routing disagreement, k3 KL, extreme-ratio share).
      no_replay: the same labels -> [n] values with the training router choosing its own experts.

    Returns:
      The Figure; a panel whose values are all positive uses a log scale.
    """
    fig, axes = _figure(len(replay), width=4.5)
    for ax, label in zip(axes, replay, strict=True):
        ax.plot(steps, no_replay[label], "o-", color="tab:red", label="without replay")
        ax.plot(steps, replay[label], "o-", color="tab:blue", label="with replay (R3)")
        if all(v > 0 for v in [*replay[label], *no_replay[label]]):
            ax.set_yscale("log")
        ax.set(xlabel="RL step", title=label)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_domain_curves(
    heldout: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    teacher_heldout: Mapping[str, float],
    reverse_kl: Mapping[str, tuple[Sequence[int], Sequence[float]]],
) -> Any:
    """A MOPD run, per domain: held-out success and reverse KL to the teacher vs step.

    Args:
      heldout: domain -> (steps, success): the student's greedy held-out success rate in that
        domain during the run; step 0 is the student the run starts from.
      teacher_heldout: domain -> the held-out success of that domain's teacher.
      reverse_kl: domain -> (steps, KL): the student's reverse KL to the domain's teacher over
        its sampled tokens.

    Returns:
      The Figure: held-out success (left, 0..1; each teacher a dashed line and the student's
      start a dotted one, in the domain's colour) and reverse KL (right).
    """
    fig, (left, right) = _figure(2, width=5.0)
    colors = dict(zip(heldout, colormaps["tab10"].colors, strict=False))
    for domain, (steps, success) in heldout.items():
        c = colors[domain]
        left.plot(steps, success, "o-", color=c, label=f"{domain}: student")
        left.axhline(teacher_heldout[domain], color=c, ls="--", label=f"{domain}: teacher")
        left.axhline(success[0], color=c, ls=":", alpha=0.6, label=f"{domain}: student start")
    for domain, (steps, kl) in reverse_kl.items():
        right.plot(steps, kl, color=colors.get(domain), label=domain)
    left.set(xlabel="MOPD step", ylabel="held-out success (greedy)", ylim=(-0.02, 1.02),
             title="held-out success per domain")  # fmt: skip
    right.set(xlabel="MOPD step", ylabel="KL(student || teacher), nats per token",
              title="reverse KL to the domain's teacher")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig
