"""Progress of a long loop (training steps, evaluation batches, converted tensors) for a person.

``Progress`` measures the rate from the second item on (the first one usually compiles) and
prints ``label done/total | <fields> | ETA``. On a terminal the line is redrawn in place; in a
pipe or a log file a line is printed at most every ``every_s`` seconds and at the end, so logs
stay short. Only process 0 of a multi-host run prints.
"""

import sys
import time
from typing import TextIO

import jax

_REDRAW_S = 0.2  # a terminal line redrawn more often only flickers


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``3725`` -> ``"1h02m"``, ``8.24`` -> ``"8.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """A loop's ``done/total``, rate and remaining time, as a line.

    Args:
      label: what is counted, first on the line (``"step"``, ``"eval batch"``).
      total: items in the whole loop.
      start: items already done before this process (a resumed run's step).
      every_s: off a terminal, the least seconds between two printed lines.
      keep: print the final line at ``close``; False clears the line instead (a sub-task
        whose result another line reports).
      stream: where to print; default ``sys.stdout``.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        start: int = 0,
        every_s: float = 30.0,
        keep: bool = True,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.start = label, total, start
        self.every_s, self.keep = every_s, keep
        self.stream = sys.stdout if stream is None else stream
        self.enabled = jax.process_index() == 0
        self.tty = self.enabled and self.stream.isatty()
        self.t_first: float | None = None  # when the first item (the compile) finished
        self.n_first = start
        self.t_created = self.t_printed = self.t_drawn = time.perf_counter()
        self.done = start

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate measured since the first item; None before the second."""
        if self.t_first is None or self.done <= self.n_first:
            return None
        per_item = (time.perf_counter() - self.t_first) / (self.done - self.n_first)
        return per_item * (self.total - self.done)

    def line(self, fields: str = "") -> str:
        """``label done/total | fields | ETA ...`` for the current count."""
        eta = self.eta_seconds()
        parts = [f"{self.label} {self.done}/{self.total}"]
        if fields:
            parts.append(fields)
        if self.done < self.total:
            parts.append("ETA " + ("-" if eta is None else format_seconds(eta)))
        else:
            parts.append(f"took {format_seconds(time.perf_counter() - self.t_created)}")
        return " | ".join(parts)

    def update(self, done: int, fields: str = "", *, force: bool = False) -> None:
        """Records ``done`` items and shows the line (on a terminal, or when due, or forced).

        Args:
          done: items done so far (including ``start``).
          fields: text shown after the count.
          force: print a full line now, wherever the output goes.
        """
        self.done = done
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.n_first = now, done
        if not self.enabled:
            return
        if force or (not self.tty and now - self.t_printed >= self.every_s):
            self._write(self.line(fields) + "\n")
            self.t_printed = now
        elif self.tty and now - self.t_drawn >= _REDRAW_S:
            self._write(self.line(fields))
            self.t_drawn = now

    def say(self, text: str) -> None:
        """Prints ``text`` as a line of its own (process 0), above a redrawn progress line."""
        if self.enabled:
            self._write(text + "\n")

    def close(self, fields: str = "") -> None:
        """Ends the line: prints the final count (``keep``) or clears it."""
        if not self.enabled:
            return
        if self.keep:
            self._write(self.line(fields) + "\n")
        elif self.tty:
            self._write("")

    def _write(self, text: str) -> None:
        # On a terminal "\r" + clear-to-end redraws the line in place.
        self.stream.write(("\r\x1b[K" if self.tty else "") + text)
        self.stream.flush()
