"""Prompts from a JSONL file: a domain without a verifier, which only its MOPD teacher scores.

A domain of a run's mixture (``config.domains.<d>.task = "jsonl"``, options ``path`` and
optionally ``domain``, ``response_bytes``) whose prompts come from a file of
``{"prompt": str, "domain": str (optional), "response": str (optional)}`` lines. Rows are split
like a task's problems, by the prompt itself (10% held out, 20% SFT, 70% RL train). The reward
is always 0: a group's rewards then tie, its outcome advantage is 0, and under MOPD those
prompts learn from their teacher's token scores alone; ``--mode=rl`` refuses such a domain.
Rows with a ``response`` can serve as SFT examples of the domain.
"""

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from mimo_jax.post_training import tasks

NAME = "jsonl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptFile(tasks.Task):
    """The prompts of a JSONL file (all rows, or those of one ``domain``); no verifier.

    Attributes:
      path: the JSONL file.
      domain: keep only rows whose ``domain`` equals this ("" keeps every row).
      response_bytes: the longest response to sample (``max_response_bytes``).
    """

    name: ClassVar[str] = NAME
    verifiable: ClassVar[bool] = False
    path: str
    domain: str = ""
    response_bytes: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.response_bytes < 1:
            raise ValueError(f"response_bytes must be >= 1, got {self.response_bytes}")
        if not self.rows:
            which = f" of domain {self.domain!r}" if self.domain else ""
            raise ValueError(f"{self.path}: no prompts{which}")

    @functools.cached_property
    def rows(self) -> list[dict[str, str]]:
        """The file's rows (of ``domain``), validated; ValueError naming file and line."""
        out = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
                if not isinstance(row, Mapping):
                    raise ValueError(f"{where}: a row must be a JSON object")
                for field in ("prompt", "domain", "response"):
                    if field in row and not isinstance(row[field], str):
                        raise ValueError(f"{where}: field {field!r} must be a string")
                if not row.get("prompt"):
                    raise ValueError(f"{where}: missing or empty field 'prompt'")
                if not self.domain or row.get("domain") == self.domain:
                    out.append(dict(row))
        return out

    @property
    def max_response_bytes(self) -> int:
        return self.response_bytes

    def _draw(self, rng: np.random.Generator) -> tuple[str, str, str]:
        row = self.rows[int(rng.integers(len(self.rows)))]
        return row["prompt"], row["prompt"], row.get("response", "")

    def _solve(self, prompt: str) -> str:
        raise ValueError(f"{self.path}: prompts from a file have no verifier")

    def reward(self, prompt: str, completion: str | bytes) -> float:
        """0.0: no verifier (see the module docstring)."""
        return 0.0

    def sft_examples(self, seed: int, n: int) -> list[dict[str, str]]:
        """SFT rows from the file's SFT split; every drawn row needs a ``response``."""
        pairs = self._sample("sft", seed, n, unique=True)
        if any(not a for _, a in pairs):
            raise ValueError(f"{self.path}: SFT examples need a 'response' on every row")
        return [{"prompt": p, "response": a, "domain": self.domain or NAME} for p, a in pairs]
