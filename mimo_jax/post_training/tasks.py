"""Verifiable tasks for SFT warm-up and on-policy RL: prompts, a verifier, a synthetic SFT set.

A task is the reward side of RL with verifiable rewards (docs/post_training.md, "Tasks"):

* ``train_prompts(seed, n)`` / ``heldout_prompts(n)`` / ``sft_examples(seed, n)`` draw problems
  from three disjoint splits of the task's problem space. A problem's split is a pure function of
  the problem (``crc32`` of the task name and its canonical key, stable across processes, unlike
  ``hash()``), so no held-out problem can appear in an RL prompt or an SFT example, whatever the
  seeds. Addition keys ``a+b`` and ``b+a`` alike, so a commuted pair never straddles the split.
* ``reward(prompt, completion)`` is the verifier: it parses the *prompt*, computes the answer
  itself and parses the completion; no stored answer is ever read. It never raises on any
  completion (junk bytes, unicode, empty); ``checked_reward`` turns a task bug (a raise or a
  non-finite value) into a ``ValueError`` naming the task and the prompt, which stops an RL run.
* The completion format, shared by every task here: the answer is the text before the first
  ``"\\n"`` (the terminator, ``task.terminator``; the whole completion when it has none, since a
  rollout loop may stop at the newline and drop it), stripped of spaces, tabs and ``"\\r"`` at
  both ends. Reward 1.0 if that answer equals the correct one exactly as a string, else 0.0
  (or ``format_reward`` for a well-formed wrong answer: ASCII digits ended by the terminator;
  0.0 by default, as in TinyZero's countdown the format reward is an opt-in shaping term).

Prompts stay under 32 bytes and answers under 8, so a byte-level tiny model (``ByteTokenizer``)
can run RL on them on CPU. Small verifiable tasks like these (digit reversal, sums, countdown)
are the usual end-to-end test of an RL pipeline: TinyZero, the torchtitan RL example, prime-rl.

A ``Mixture`` maps domains to tasks with prompt-sampling weights, so that SFT, RL and MOPD draw
from several tasks at once; a one-domain mixture draws exactly the plain task's prompts and rows.
"""

import abc
import dataclasses
import fractions
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np

TERMINATOR = "\n"
# Buckets of crc32 % 100: [0, 10) held out, [10, 30) SFT, [30, 100) RL train.
_HELDOUT_BUCKETS = 10
_SFT_BUCKETS = 30
_SPLITS = ("train", "heldout", "sft")
# Rejection sampling draws at most this many problems per prompt asked for before giving up (a
# split far smaller than the request would otherwise loop forever).
_MAX_DRAWS_PER_PROMPT = 1000
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_ANSWER_STRIP = " \t\r"


def extract_answer(completion: str | bytes) -> tuple[str, bool]:
    """The answer line of a completion and whether the terminator ended it.

    Args:
      completion: generated text after the prompt; bytes are decoded as UTF-8 with replacement.

    Returns:
      (answer, terminated): the text before the first ``TERMINATOR`` (all of it when there is
      none) stripped of spaces, tabs and carriage returns, and whether a terminator was found.
    """
    if isinstance(completion, bytes):
        completion = completion.decode("utf-8", errors="replace")
    line, sep, _ = completion.partition(TERMINATOR)
    return line.strip(_ANSWER_STRIP), bool(sep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
    """Prompts from three disjoint splits of a problem space, and the verifier that scores them.

    Subclasses define ``_draw`` (one random problem: its canonical key, prompt and answer) and
    ``_solve`` (the verifier's own answer, computed from the prompt text alone).

    Attributes:
      format_reward: reward of a well-formed wrong answer (ASCII digits and the terminator); 0.0
        by default, so the reward is plain success.
    """

    name: ClassVar[str]  # registry name; also the ``domain`` of its SFT examples
    terminator: ClassVar[str] = TERMINATOR
    verifiable: ClassVar[bool] = True  # False: no verifier (``prompt_file.PromptFile``)
    format_reward: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"format_reward must lie in [0, 1), got {self.format_reward}")

    @property
    @abc.abstractmethod
    def max_response_bytes(self) -> int:
        """Length in bytes of the longest correct response, terminator included."""

    @abc.abstractmethod
    def _draw(self, rng: np.random.Generator) -> tuple[str, str, str]:
        """One random problem: (canonical key for the split, prompt, correct answer)."""

    @abc.abstractmethod
    def _solve(self, prompt: str) -> str:
        """The correct answer, parsed and computed from the prompt; ValueError if malformed."""

    def split_of(self, key: str) -> str:
        """'heldout', 'sft' or 'train': the split of the problem with canonical ``key``."""
        bucket = zlib.crc32(f"{self.name}|{key}".encode()) % 100
        if bucket < _HELDOUT_BUCKETS:
            return "heldout"
        return "sft" if bucket < _SFT_BUCKETS else "train"

    def _sample(self, split: str, seed: int, n: int, unique: bool) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs of ``split``, a pure function of (task, split, seed, n);
        each is a prefix of the draw for a larger ``n``."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {_SPLITS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        salt = zlib.crc32(f"{self.name}|{split}".encode())
        rng = np.random.default_rng([salt, seed])
        out, seen = [], set()
        for _ in range(_MAX_DRAWS_PER_PROMPT * max(n, 1)):
            if len(out) == n:
                return out
            key, prompt, answer = self._draw(rng)
            if self.split_of(key) != split or (unique and prompt in seen):
                continue
            seen.add(prompt)
            out.append((prompt, answer))
        if len(out) == n:
            return out
        raise ValueError(f"task {self.name!r}: could not draw {n} {split} prompts, got {len(out)}")

    def train_prompts(self, seed: int, n: int) -> list[str]:
        """``n`` RL prompts from the train split (with repeats), a pure function of ``seed``.

        Args:
          seed: a non-negative int, e.g. a pure function of (run seed, step), so that a resumed
            run sees the same prompts.
          n: number of prompts.

        Returns:
          list of ``n`` prompt strings.
        """
        return [p for p, _ in self._sample("train", seed, n, unique=False)]

    def heldout_prompts(self, n: int) -> list[str]:
        """The first ``n`` distinct held-out prompts, always the same ones (no seed on purpose).

        Args:
          n: number of prompts; ``heldout_prompts(k)`` is a prefix of ``heldout_prompts(n)``.

        Returns:
          list of ``n`` distinct prompt strings, none of them ever a train or SFT prompt.
        """
        return [p for p, _ in self._sample("heldout", 0, n, unique=True)]

    def sft_examples(self, seed: int, n: int) -> list[dict[str, str]]:
        """A synthetic warm-up set from the SFT split: correct responses, terminator included.

        Args:
          seed: a non-negative int.
          n: number of examples (distinct prompts).

        Returns:
          list of ``{"prompt", "response", "domain"}`` dicts, the SFT JSONL row layout.
        """
        pairs = self._sample("sft", seed, n, unique=True)
        return [
            {"prompt": p, "response": a + self.terminator, "domain": self.name} for p, a in pairs
        ]

    def reward(self, prompt: str, completion: str | bytes) -> float:
        """Verifier score of ``completion`` for ``prompt`` (format in the module docstring).

        Args:
          prompt: a prompt of this task; a malformed prompt raises ``ValueError`` (a bug of the
            caller, which ``checked_reward`` reports with the task and prompt).
          completion: the generated text after the prompt; any string or bytes.

        Returns:
          1.0 if the answer is exactly correct, ``format_reward`` if it is well-formed but wrong,
          else 0.0.
        """
        expected = self._solve(prompt)
        answer, terminated = extract_answer(completion)
        if answer == expected:
            return 1.0
        if terminated and _DIGITS.fullmatch(answer):
            return self.format_reward
        return 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitReversal(Task):
    """``rev 4827=`` -> ``7284``: reverse a string of ``min_digits``..``max_digits`` decimal
    digits, leading and trailing zeros kept (``rev 0450=`` -> ``0540``)."""

    name: ClassVar[str] = "digit_reversal"
    min_digits: int = 3
    max_digits: int = 6

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_digits <= self.max_digits <= 20:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits <= 20, got {self.min_digits}, "
                f"{self.max_digits}"
            )

    @property
    def max_response_bytes(self) -> int:
        return self.max_digits + len(self.terminator)

    def _draw(self, rng):
        length = int(rng.integers(self.min_digits, self.max_digits + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=length))
        return digits, f"rev {digits}=", digits[::-1]

    def _solve(self, prompt):
        m = re.fullmatch(r"rev ([0-9]+)=", prompt, re.ASCII)
        if m is None:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}")
        return m.group(1)[::-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Addition(Task):
    """``17+25=`` -> ``42``: the sum of two integers in [0, ``max_operand``], in canonical decimal
    (no sign, no leading zeros: ``042`` is wrong)."""

    name: ClassVar[str] = "addition"
    max_operand: int = 99

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.max_operand <= 10**9:
            raise ValueError(f"max_operand must lie in [1, 1e9], got {self.max_operand}")

    @property
    def max_response_bytes(self) -> int:
        return len(str(2 * self.max_operand)) + len(self.terminator)

    def _draw(self, rng):
        a, b = (int(x) for x in rng.integers(0, self.max_operand + 1, size=2))
        # The key is the unordered pair, so a+b and b+a always share a split.
        return f"{min(a, b)}+{max(a, b)}", f"{a}+{b}=", str(a + b)

    def _solve(self, prompt):
        # Operands are bounded (at most 10 digits), so int() stays cheap and cannot overflow
        # Python's int-string conversion limit.
        m = re.fullmatch(r"([0-9]{1,10})\+([0-9]{1,10})=", prompt, re.ASCII)
        if m is None:
            raise ValueError(f"not an {self.name} prompt: {prompt!r}")
        return str(int(m.group(1)) + int(m.group(2)))


TASKS: dict[str, Callable[..., Task]] = {"addition": Addition, "digit_reversal": DigitReversal}


def get_task(name: str, **kwargs) -> Task:
    """The task registered under ``name``.

    Args:
      name: a key of ``TASKS``.
      **kwargs: fields of that task's dataclass (e.g. ``max_digits=4``, ``format_reward=0.1``).

    Returns:
      the task instance.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def checked_reward(task: Task, prompt: str, completion: str | bytes) -> float:
    """``task.reward`` that fails loudly: a raise or a non-finite value becomes a ValueError.

    Args:
      task: the task whose verifier scores the completion.
      prompt: the prompt.
      completion: the generated text.

    Returns:
      the reward as a finite Python float.
    """
    try:
        value = task.reward(prompt, completion)
    except Exception as e:
        raise ValueError(f"task {task.name!r}: reward raised on prompt {prompt!r}: {e!r}") from e
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"task {task.name!r}: reward returned non-number {value!r} on prompt {prompt!r}"
        ) from e
    if not math.isfinite(value):
        raise ValueError(f"task {task.name!r}: reward returned {value} on prompt {prompt!r}")
    return value


def success_rate(task: Task, completions_by_prompt: Mapping[str, Sequence[str]]) -> float:
    """Share of completions the verifier scores exactly correct (reward 1.0), over all prompts.

    Args:
      task: the task.
      completions_by_prompt: {prompt: its sampled completions}.

    Returns:
      successes / completions, in [0, 1].
    """
    scores = [
        checked_reward(task, p, c) >= 1.0 for p, cs in completions_by_prompt.items() for c in cs
    ]
    if not scores:
        raise ValueError(f"task {task.name!r}: success_rate of no completions")
    return sum(scores) / len(scores)


class Mixture:
    """Domains -> verifiable tasks, with prompt-sampling weights.

    Every draw is a pure function of its seed: ``counts(n)`` splits ``n`` by weight, and each
    domain draws its share from its own task with a seed derived from (seed, domain index). A
    one-domain mixture passes the seed through unchanged and does not shuffle, so it yields
    exactly the task's own prompts and SFT rows.

    Attributes:
      domains: the domain names, in the order of the ``tasks`` mapping.
      weights: {domain: weight}, every weight finite and > 0 (not normalised).
    """

    def __init__(self, tasks: Mapping[str, Task], weights: Mapping[str, float] | None = None):
        """Builds the mixture.

        Args:
          tasks: {domain: task}, at least one; domains keep the mapping's order.
          weights: {domain: weight > 0} with exactly the keys of ``tasks``; None: equal weights.

        Raises:
          ValueError: naming the domain of a bad name, task or weight, or a missing or extra
            weight.
        """
        if not tasks:
            raise ValueError("a Mixture needs at least one domain")
        for domain, task in tasks.items():
            if not isinstance(domain, str) or not domain:
                raise ValueError(f"domain names must be non-empty strings, got {domain!r}")
            if not isinstance(task, Task):
                raise ValueError(f"domain {domain!r}: expected a Task, got {type(task).__name__}")
        self.domains: tuple[str, ...] = tuple(tasks)
        self._tasks = dict(tasks)
        if weights is None:
            weights = dict.fromkeys(self.domains, 1.0)
        for domain in self.domains:
            if domain not in weights:
                raise ValueError(f"weights have no entry for domain {domain!r}")
        for domain, w in weights.items():
            if domain not in self._tasks:
                raise ValueError(
                    f"weights name domain {domain!r}, not one of the domains {self.domains}"
                )
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf:
                raise ValueError(
                    f"weight of domain {domain!r} must be a finite number > 0, got {w!r}"
                )
        self.weights: dict[str, float] = {d: float(weights[d]) for d in self.domains}

    def __repr__(self) -> str:
        parts = ", ".join(f"{d}: {self._tasks[d]!r} x{self.weights[d]:g}" for d in self.domains)
        return f"Mixture({parts})"

    def task(self, domain: str) -> Task:
        """The task of ``domain``; ValueError naming it and the known domains if unknown."""
        if domain not in self._tasks:
            raise ValueError(f"unknown domain {domain!r}; known domains: {', '.join(self.domains)}")
        return self._tasks[domain]

    def counts(self, n: int) -> dict[str, int]:
        """A deterministic split of ``n`` draws by weight.

        Largest remainder: each domain gets the floor of its exact share ``n * w / sum(w)``
        (computed in exact rational arithmetic, so float rounding cannot break ties), and the
        rest go one each to the largest fractional parts, ties to the earlier domain.

        Args:
          n: number of draws, >= 0.

        Returns:
          {domain: count} in ``domains`` order, summing to ``n``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        weights = [fractions.Fraction(self.weights[d]) for d in self.domains]
        total = sum(weights)
        shares = [n * w / total for w in weights]
        counts = [math.floor(s) for s in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        return dict(zip(self.domains, counts, strict=True))

    def _domain_seed(self, seed: int, index: int) -> int:
        """The seed of domain ``index``'s draws: ``seed`` itself for a one-domain mixture."""
        if len(self.domains) == 1:
            return seed
        # 31 bits, like the RL loop's step seeds: a valid seed for every task.
        return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)

    def train_prompts(self, seed: int, n: int) -> list[tuple[str, str]]:
        """``n`` RL prompts, ``counts(n)[d]`` from each domain's train split; pure in ``seed``.

        Args:
          seed: a non-negative int (e.g. the RL loop's per-step seed).
          n: number of prompts.

        Returns:
          (domain, prompt) pairs grouped by domain in ``domains`` order, each domain's prompts
          ``task.train_prompts(<seed of (seed, domain index)>, count)``.
        """
        out = []
        for i, (domain, k) in enumerate(self.counts(n).items()):
            prompts = self._tasks[domain].train_prompts(self._domain_seed(seed, i), k)
            out += [(domain, p) for p in prompts]
        return out

    def sft_examples(self, seed: int, n: int) -> list[dict[str, str]]:
        """A synthetic warm-up set: ``counts(n)[d]`` SFT-split examples of each domain.

        Args:
          seed: a non-negative int.
          n: number of examples.

        Returns:
          ``{"prompt", "response", "domain"}`` rows (``domain``: the mixture's domain key), in
          an order shuffled by ``seed``; a one-domain mixture keeps the task's own order.
        """
        rows = []
        for i, (domain, k) in enumerate(self.counts(n).items()):
            examples = self._tasks[domain].sft_examples(self._domain_seed(seed, i), k)
            rows += [{**row, "domain": domain} for row in examples]
        if len(self.domains) == 1:
            return rows
        order = np.random.default_rng([zlib.crc32(b"mixture|sft"), seed]).permutation(len(rows))
        return [rows[i] for i in order]
