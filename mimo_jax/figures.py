"""Figures for the notebooks (and anyone else): each function takes data in and returns a Figure.

The notebooks in ``notebooks/`` compute nothing themselves: they call the library, pass the
numbers to one of these functions, and save the result with ``save_figure``. Tests call the same
functions, so a figure that a notebook shows is a figure that CI has drawn.

matplotlib is imported inside the functions, never at module import, so ``mimo_jax`` itself does
not depend on it (it is in ``requirements-dev.txt``; Colab ships it). Every plot uses the
object-oriented API on a fresh ``Figure`` (no pyplot state), so drawing works headless and
figures never accumulate in a global registry.

Sections: saving and live display; training; decoding; conversion; attention. New notebooks add
a section (e.g. sharding: mesh layouts) with the same conventions: data in, Figure out.
"""

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Environment variable naming the directory that ``save_figure`` writes to (the notebook tests
# point it at a temporary directory); unset means the current directory.
OUT_DIR_ENV = "MIMO_NOTEBOOK_OUT"


def _figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0):
    """A new Figure with ``ncols`` side-by-side axes (a list), detached from pyplot."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (optional dependency)

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
    from matplotlib.patches import Rectangle  # noqa: PLC0415

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
