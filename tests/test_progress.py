"""mimo_jax.progress: the ETA counts from the end of the first item; terminals get a redrawn
line, logs get few lines."""

import io

import pytest

from mimo_jax import progress
from mimo_jax.progress import Progress, format_seconds


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """A settable perf_counter for the progress module."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_format_seconds():
    assert [format_seconds(s) for s in (8.24, 59.9, 75, 3599, 3725)] == [
        "8.2s", "59.9s", "1m15s", "59m59s", "1h02m",
    ]  # fmt: skip


def test_eta_excludes_the_first_item_and_logs_stay_short(clock):
    out = io.StringIO()
    p = Progress("step", 10, start=2, every_s=30.0, stream=out)
    clock[0] = 150.0  # the first item (compiling) took 50 s: over every_s, so a line
    p.update(3)
    assert p.line() == "step 3/10 | ETA -"  # no rate from one item
    clock[0] = 154.0
    p.update(5, "loss 1.0")  # 2 items in 4 s: 5 left take 10 s; not printed (4 s < every_s)
    assert p.line("loss 1.0") == "step 5/10 | loss 1.0 | ETA 10.0s"
    clock[0] = 190.0
    p.update(6)
    p.update(7, "x", force=True)
    clock[0] = 200.0
    p.update(10)
    p.close("done")
    assert out.getvalue().splitlines() == [
        "step 3/10 | ETA -",
        "step 6/10 | ETA 53.3s",  # 40 s after the last print: (190 - 150) / 3 items * 4 left
        "step 7/10 | x | ETA 30.0s",  # forced
        "step 10/10 | done | took 1m40s",  # since the Progress was made
    ]


def test_terminal_line_is_redrawn_and_cleared(clock):
    out = _Terminal()
    p = Progress("eval batch", 4, keep=False, stream=out)
    for i in range(1, 5):
        clock[0] += 1.0
        p.update(i)
    p.close()
    assert out.getvalue() == (
        "\r\x1b[Keval batch 1/4 | ETA -"
        "\r\x1b[Keval batch 2/4 | ETA 2.0s"
        "\r\x1b[Keval batch 3/4 | ETA 1.0s"
        "\r\x1b[Keval batch 4/4 | took 4.0s"
        "\r\x1b[K"
    )
