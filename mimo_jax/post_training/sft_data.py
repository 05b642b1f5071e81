"""SFT data: prompt/response examples tokenised into batches masked to the response tokens.

Examples are ``{"prompt", "response", "domain"?}`` rows, read from JSONL (``read_jsonl``) or
produced by a task's generator (``Task.sft_examples``), either through ``load_examples``.
``SFTDataset`` tokenises them with the run's tokenizer and ``SFTDataset.batch`` builds batches
that are a pure function of (seed, step), like pre-training's ``data.get_batch``, so a resumed
run sees the same batches.

* Tokens of an example: ``prompt ids + response ids + end``. The end token is the tokenizer's
  ``eos_id`` if it has one, else its end-of-text document separator (``doc_sep_id``). The byte
  tokenizer has neither usable as an end (its separator, NUL, ends pre-training documents, not
  replies), so there the end is the terminator ``"\\n"`` (``tasks.TERMINATOR``, the byte at
  which the tasks' verifier and the rollouts stop): a response that already ends with it gets
  no second one. ``end_id=`` overrides the choice.
  Prompt and response are tokenised separately, so the boundary between them is exact whatever
  the tokenizer merges; a prompt is used as given (render it with ``chat.ChatTemplate`` and
  ``add_generation_prompt=True`` first for a chat model).
* Loss mask (docs/post_training.md, "SFT data"): the labels are the next tokens, and
  ``loss_mask`` is 1 exactly where the label is a response token or the end token, 0 where it is
  a prompt token, padding, or (packing) the first token of the next example.
* Too-long examples (more than ``seq_len + 1`` tokens): the prompt is truncated from the left
  (its end, next to the response, is kept) down to one token; an example whose response and end
  token do not fit even then is dropped. Both are counted (``num_truncated``, ``num_dropped``),
  never silent, and the end token is never cut.
* Padding (the default): one example per row, right-padded; causal attention makes the padding
  invisible to the example, so the loss is exact with today's model.
* Packing: several examples per row, ``positions`` restarting at 0 at each example and
  ``segment_ids`` (1, 2, ... per example, 0 on padding) saying which tokens belong together.
  The model keeps each packed example to itself when given them
  (``MiMoV2Flash(ids, positions, segment_ids=...)``, the XLA attention path; ``sft.run`` passes
  them with ``config.sft.packing``), so a packed example gets the outputs it has alone.
"""

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mimo_jax.data import ByteTokenizer, Tokenizer
from mimo_jax.post_training.tasks import TERMINATOR, get_task

_FIELDS = ("prompt", "response", "domain")


def _check_row(row: Any, where: str) -> dict[str, str]:
    """A validated ``{"prompt", "response", "domain"?}`` row; ValueError naming ``where``."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: an example must be a JSON object, got {type(row).__name__}")
    for field in ("prompt", "response"):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
    for field in _FIELDS:
        if field in row and not isinstance(row[field], str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}"
            )
    for field in ("prompt", "response"):
        if not row[field]:
            raise ValueError(f"{where}: field {field!r} is empty")
    return {f: row[f] for f in _FIELDS if f in row}


def read_jsonl(path: str) -> list[dict[str, str]]:
    """Reads SFT examples, one JSON object per line; blank lines are skipped.

    Args:
      path: a JSONL file of ``{"prompt": str, "response": str, "domain": str (optional)}``;
        other keys are ignored.

    Returns:
      The examples in file order, each with ``prompt``, ``response`` and ``domain`` if given.

    Raises:
      ValueError naming the file and line (and the field where one is at fault): invalid JSON,
      not an object, a missing, non-string or empty ``prompt`` / ``response``, a non-string
      ``domain``, or no example at all.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            rows.append(_check_row(row, f"{path}:{lineno}"))
    if not rows:
        raise ValueError(f"{path}: no SFT examples")
    return rows


def load_examples(source: str, *, seed: int = 0, num_examples: int = 0) -> list[dict[str, str]]:
    """SFT examples from a JSONL file or, for ``"task:<name>"``, from that task's generator.

    Args:
      source: a JSONL path (``read_jsonl``) or ``"task:<name>"`` (``tasks.get_task``).
      seed: the task generator's seed (ignored for JSONL).
      num_examples: how many examples a task generates (> 0); for JSONL 0 keeps all of them,
        else the first ``num_examples``.

    Returns:
      ``{"prompt", "response", "domain"?}`` rows.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if source.startswith("task:"):
        if not num_examples:
            raise ValueError(f"{source}: a task's SFT set needs num_examples > 0")
        return get_task(source.removeprefix("task:")).sft_examples(seed, num_examples)
    rows = read_jsonl(source)
    return rows[:num_examples] if num_examples else rows


def end_token_id(tokenizer: Tokenizer) -> int | None:
    """The id appended after each response, or None for the byte tokenizer (see module doc).

    Raises:
      ValueError: a non-byte tokenizer with neither ``eos_id`` nor an end-of-text token.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return None
    eos = getattr(tokenizer, "eos_id", None)
    end = eos if eos is not None else tokenizer.doc_sep_id
    if end is None:
        raise ValueError("the tokenizer has no eos_id and no end-of-text token; pass end_id=")
    return int(end)


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """One SFT batch; every array is [B, T] (T = ``seq_len``).

    Attributes:
      ids: int32 model inputs.
      labels: int32 next tokens (``labels[:, i]`` is the token after ``ids[:, i]``).
      loss_mask: float32, 1 where the label is a response or end token, else 0.
      positions: int32 position of each input within its example (from 0); padding continues
        the count of the example before it.
      segment_ids: int32, 1, 2, ... for the examples of a row, 0 on padding.
    """

    ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Encoded:
    prompt: np.ndarray  # int32 [P], P >= 1
    response: np.ndarray  # int32 [R], end token included


class SFTDataset:
    """Tokenised SFT examples and the batches drawn from them.

    Attributes:
      seq_len: T, the model's input length; an example fills at most T + 1 tokens of a row.
      pad_id: the token written at padding (the tokenizer's ``pad_id``, else 0); never a label
        that counts.
      examples: the kept examples, tokenised.
      domains: the ``domain`` of each kept example ("" when absent).
      num_truncated: kept examples whose prompt lost tokens on the left.
      num_dropped: examples whose response and end token alone exceed T tokens.
    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        end_id: int | None = None,
        source: str = "examples",
    ):
        """Tokenises and length-checks the examples.

        Args:
          rows: ``{"prompt", "response", "domain"?}`` rows (``read_jsonl``, ``Task.sft_examples``).
          tokenizer: the run's tokenizer.
          seq_len: T.
          end_id: the end-of-response token; None chooses it from the tokenizer (module doc).
          source: named in errors about a row (e.g. the JSONL path).

        Raises:
          ValueError: a malformed row (naming ``source`` and the row index), ``seq_len`` < 2,
            or every example dropped.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.pad_id = int(getattr(tokenizer, "pad_id", None) or 0)
        end = end_token_id(tokenizer) if end_id is None else end_id
        self.examples: list[_Encoded] = []
        self.domains: list[str] = []
        self.num_truncated = self.num_dropped = 0
        for i, row in enumerate(rows):
            row = _check_row(row, f"{source}[{i}]")
            response = row["response"]
            if end is None and not response.endswith(TERMINATOR):
                response += TERMINATOR
            prompt = tokenizer.encode(row["prompt"]).astype(np.int32)
            resp = tokenizer.encode(response).astype(np.int32)
            if end is not None:
                resp = np.append(resp, np.int32(end))
            # A row holds T + 1 tokens; at least one prompt token must precede the response so
            # that its first token has an input position to be predicted from.
            room = seq_len + 1 - len(resp)
            if room < 1:
                self.num_dropped += 1
                continue
            if len(prompt) > room:
                prompt = prompt[len(prompt) - room :]
                self.num_truncated += 1
            self.examples.append(_Encoded(prompt, resp))
            self.domains.append(row.get("domain", ""))
        if not self.examples:
            raise ValueError(
                f"{source}: all {self.num_dropped} examples dropped: no response fits "
                f"seq_len={seq_len}"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, *, batch_size: int, seed: int, step: int, packing: bool = False) -> SFTBatch:
        """The batch of ``step``: the same (seed, step) always gives the same batch.

        Padding: one example per row; step s takes examples s * B ... s * B + B - 1 of an
        endless stream of epochs, each epoch a permutation keyed by (seed, epoch), so every
        example is seen once per epoch. Packing: the examples of a permutation keyed by (seed,
        step) fill the rows in order, each going to the current row while it fits and opening
        the next row otherwise; the model must be given ``segment_ids`` (module doc).

        Args:
          batch_size: B.
          seed, step: non-negative ints.
          packing: several examples per row instead of one.

        Returns:
          An ``SFTBatch`` of [B, T] arrays.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0 or step < 0:
            raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
        pick = self._packed_rows if packing else self._padded_rows
        return self._assemble(pick(batch_size, seed, step))

    def _padded_rows(self, b: int, seed: int, step: int) -> list[list[int]]:
        n = len(self.examples)
        slots = np.arange(step * b, (step + 1) * b)  # [B] indices into the epoch stream
        perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(slots // n)}
        return [[int(perms[s // n][s % n])] for s in slots]

    def _packed_rows(self, b: int, seed: int, step: int) -> list[list[int]]:
        rng = np.random.default_rng([seed, step])
        rows: list[list[int]] = [[]]
        used = 0  # tokens in the current row
        while True:
            for i in rng.permutation(len(self.examples)):
                size = self._size(int(i))
                if used + size > self.seq_len + 1:
                    if len(rows) == b:
                        return rows
                    rows.append([])
                    used = 0
                rows[-1].append(int(i))
                used += size

    def _size(self, i: int) -> int:
        return len(self.examples[i].prompt) + len(self.examples[i].response)

    def _assemble(self, rows: Sequence[Sequence[int]]) -> SFTBatch:
        b, t = len(rows), self.seq_len
        tokens = np.full((b, t + 1), self.pad_id, np.int32)  # [B, T + 1]
        mask = np.zeros((b, t + 1), np.float32)  # 1 at response tokens, indexed by token
        positions = np.zeros((b, t + 1), np.int32)
        segments = np.zeros((b, t + 1), np.int32)
        for r, row in enumerate(rows):
            start = 0
            for j, i in enumerate(row):
                ex = self.examples[i]
                p, n = len(ex.prompt), self._size(i)
                tokens[r, start : start + n] = np.concatenate([ex.prompt, ex.response])
                mask[r, start + p : start + n] = 1.0
                positions[r, start : start + n] = np.arange(n)
                segments[r, start : start + n] = j + 1
                start += n
            # Padding continues the last example's count: a padded row's positions are then
            # arange(T), the model's default.
            positions[r, start:] = np.arange(n, n + t + 1 - start)
        return SFTBatch(
            ids=tokens[:, :-1],
            labels=tokens[:, 1:],
            loss_mask=mask[:, 1:],  # the label at input i is token i + 1
            positions=positions[:, :-1],
            segment_ids=segments[:, :-1],
        )


def mtp_targets(batch: SFTBatch, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Labels and loss masks of the MTP depths, in ``loss.compute_loss``'s convention.

    Depth k at input i predicts ``labels[:, i + k + 1]`` (``jnp.roll(labels, -(k + 1))``). Its
    mask is 1 where that label counts for the main loss (a response or end token), lies within
    the row, and belongs to the same example as input i; so it is 0 on prompt labels, padding,
    the wrapped tail and, when packing, across an example boundary.

    Args:
      batch: an ``SFTBatch``.
      depth: D, the number of MTP layers.

    Returns:
      D pairs ``(labels_k int32 [B, T], mask_k float32 [B, T])``, k = 0 .. D - 1.
    """
    t = batch.labels.shape[1]
    out = []
    for k in range(depth):
        s = k + 1
        labels = np.roll(batch.labels, -s, axis=1)
        mask = np.zeros_like(batch.loss_mask)
        same = batch.segment_ids[:, : t - s] == batch.segment_ids[:, s:]  # [B, T - s]
        mask[:, : t - s] = batch.loss_mask[:, s:] * same
        out.append((labels, mask))
    return out
