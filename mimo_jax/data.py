"""Token data for training: tokenizers, corpora and batches that are a pure function of the step.

* ``ByteTokenizer`` (256 ids, UTF-8 bytes) and ``HFTokenizer`` (a ``tokenizer.json`` through the
  ``tokenizers`` library) share one small interface; ``load_tokenizer(None)`` is bytes. A hub
  tokenizer directory (``HFTokenizer.from_dir``) also gives the named special tokens and the
  BOS / EOS / pad ids from its ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``generation_config.json`` (docs/tokenizer.md).
* ``load_tokens(spec)`` returns 1-D train / validation token arrays from either
  - ``source="stdlib"``: the embedded default corpus, this Python's own standard-library ``.py``
    sources, read at run time (no download, nothing cached on disk), or
  - ``source="files"``: pre-tokenised ``.bin`` (raw little-endian ``uint16``/``uint32``, the
    nanoGPT layout) or ``.npy`` files (memory-mapped), or any other file read as UTF-8 text and
    tokenised.
  Text is split into train / validation by file (``crc32(path) % 10000 < 100 * val_percent``,
  stable across processes, unlike ``hash()``), so no document leaks across the split. Documents
  are joined with the tokenizer's document separator: byte 0 (NUL, which never occurs in
  source code) for bytes, an end-of-text special token for HF tokenizers that have one.
* ``get_batch(tokens, seed=, step=)`` draws random crops from ``np.random.default_rng([seed,
  step])``: a run resumed at step s sees exactly the batches of an uninterrupted run, with no
  iterator state to checkpoint. ``eval_batches`` takes fixed windows spread evenly over the
  split instead, so validation losses are comparable across runs.
* Bits per byte: ``bpb = loss_nats_per_token / ln 2 / bytes_per_token`` (``bits_per_byte``);
  ``bytes_per_token`` is 1 for bytes and measured on the validation tokens for HF tokenizers.
"""

import dataclasses
import glob
import json
import math
import os
import sysconfig
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

BYTE_DOC_SEP = 0  # NUL: absent from every stdlib .py file, so it marks document boundaries
# Excluded from the stdlib corpus: third-party code, test suites (huge, repetitive data files)
# and the two largest legacy tools.
_STDLIB_EXCLUDE = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_HF_DOC_SEP_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BIN_DTYPES = ("uint16", "uint32")


class Tokenizer(Protocol):
    vocab_size: int
    doc_sep_id: int | None

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...
    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, no special tokens (byte 0 doubles as separator)."""

    vocab_size = 256
    doc_sep_id = BYTE_DOC_SEP

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` as int32 ids, shape [len(bytes)]."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Returns the raw bytes; ids outside 0..255 are a ValueError, not silently wrapped."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte ids must lie in [0, 256), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes UTF-8, replacing invalid sequences (a sample may cut a character in two)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded with ``tokenizers.Tokenizer.from_file``.

    Attributes:
      special_tokens: named special tokens, e.g. ``{"eos_token": "<|im_end|>"}`` (empty unless
        given, as ``from_dir`` does).
      bos_id / eos_id / pad_id: ids of the ``bos_token`` / ``eos_token`` / ``pad_token``, or None.
      stop_ids: ids that end a generated reply: ``eos_id`` first, then the other ``stop_ids``
        passed in (``generation_config.json``'s ``eos_token_id`` for ``from_dir``).
    """

    def __init__(
        self,
        path: str,
        special_tokens: Mapping[str, str] | None = None,
        stop_ids: Sequence[int] = (),
    ):
        import tokenizers  # noqa: PLC0415  (only needed for real-data runs)

        self.path = path
        self.tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.doc_sep_id = next(
            (i for s in _HF_DOC_SEP_CANDIDATES if (i := self.tok.token_to_id(s)) is not None), None
        )
        self.special_tokens = dict(special_tokens or {})
        self.bos_id, self.eos_id, self.pad_id = (
            self._special_id(k) for k in ("bos_token", "eos_token", "pad_token")
        )
        first = () if self.eos_id is None else (self.eos_id,)
        self.stop_ids = tuple(dict.fromkeys((*first, *(int(i) for i in stop_ids))))

    @classmethod
    def from_dir(cls, directory: str) -> "HFTokenizer":
        """Loads a hub tokenizer directory: ``tokenizer.json`` plus its special tokens.

        Named special tokens (``*_token`` keys) come from ``tokenizer_config.json``; as in
        transformers, ``special_tokens_map.json`` overrides them only when the config has no
        ``added_tokens_decoder``. Extra stop ids come from ``generation_config.json``'s
        ``eos_token_id`` (an int or a list). Both JSON files are optional.

        Args:
          directory: a directory holding at least ``tokenizer.json``.

        Returns:
          The tokenizer, with ``special_tokens``, ``bos_id``/``eos_id``/``pad_id`` and ``stop_ids``.
        """
        config = _read_json_if_present(directory, "tokenizer_config.json")
        special = _named_tokens(config)
        if "added_tokens_decoder" not in config:
            special |= _named_tokens(_read_json_if_present(directory, "special_tokens_map.json"))
        eos = _read_json_if_present(directory, "generation_config.json").get("eos_token_id")
        stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(os.path.join(directory, "tokenizer.json"), special, stop_ids)

    def _special_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self.tok.token_to_id(content)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without template special tokens (BOS/EOS), int32 [N]."""
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """``encode`` over many documents, parallelised inside ``tokenizers``."""
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        return self.decode(ids).encode("utf-8")


def _read_json_if_present(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _named_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """``{"eos_token": "<|im_end|>", ...}`` from a config's ``*_token`` entries.

    A token is written either as its string or as a serialised ``AddedToken`` (a dict with
    ``"content"``); other values (``add_bos_token: true``, ``null``) are not tokens.
    """
    named = {}
    for key, value in config.items():
        content = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(content, str):
            named[key] = content
    return named


def load_tokenizer(path: str | None) -> Tokenizer:
    """Returns ``HFTokenizer.from_dir(path)`` for a directory, ``HFTokenizer(path)`` for a
    ``tokenizer.json``, or ``ByteTokenizer()`` when ``path`` is None or empty."""
    if not path:
        return ByteTokenizer()
    return HFTokenizer.from_dir(path) if os.path.isdir(path) else HFTokenizer(path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where tokens come from. ``""`` and ``0`` mean unset, as in the ml_collections config.

    Attributes:
      source: "stdlib" (embedded default corpus) or "files".
      train_files: glob (``**`` allowed) of training files; source="files" only.
      validation_files: glob of validation files; if unset, the ``train_files`` matches are split
        by file with ``val_percent``.
      tokenizer: path to a ``tokenizer.json`` (or a hub tokenizer directory) for text; None
        means bytes.
      val_percent: share of files (percent) held out for validation when splitting by file.
      max_bytes: cap on bytes read from disk per split (train and validation each); None = all.
      dtype: element type of ``.bin`` token files, "uint16" (nanoGPT) or "uint32".
      vocab_size: if set, every token must be below it.
    """

    source: str = "stdlib"
    train_files: str | None = None
    validation_files: str | None = None
    tokenizer: str | None = None
    val_percent: float = 2.0
    max_bytes: int | None = None
    dtype: str = "uint16"
    vocab_size: int | None = None

    def __post_init__(self):
        for f in ("train_files", "validation_files", "tokenizer", "max_bytes", "vocab_size"):
            if not getattr(self, f):  # normalise the config's "" / 0 to None
                object.__setattr__(self, f, None)
        if self.source not in ("stdlib", "files"):
            raise ValueError(f"source must be 'stdlib' or 'files', got {self.source!r}")
        if self.source == "files" and self.train_files is None:
            raise ValueError("train_files (a glob) is required when source='files'")
        if not 0 < self.val_percent < 100:
            raise ValueError(f"val_percent must lie in (0, 100), got {self.val_percent}")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 = all), got {self.max_bytes}")
        if self.dtype not in _BIN_DTYPES:
            raise ValueError(f"dtype must be one of {_BIN_DTYPES}, got {self.dtype!r}")

    @classmethod
    def from_any(cls, spec: "DataSpec | Mapping[str, Any] | Any") -> "DataSpec":
        """Accepts a DataSpec, a dict or an ml_collections ConfigDict (via ``to_dict``)."""
        if isinstance(spec, DataSpec):
            return spec
        d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown data spec field(s) {unknown}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    """1-D token arrays (possibly memory-mapped) and the tokenizer that decodes them.

    ``tokenizer`` is None for token files loaded without a ``tokenizer`` path.
    """

    train: np.ndarray  # [N_train]
    validation: np.ndarray  # [N_val]
    tokenizer: Tokenizer | None


def stdlib_files() -> tuple[str, list[str]]:
    """Returns (stdlib root, sorted posix paths of its ``.py`` files relative to the root)."""
    root = sysconfig.get_paths()["stdlib"]
    rel = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _STDLIB_EXCLUDE]  # prune site-packages early
        rel += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return root, sorted(p.replace(os.sep, "/") for p in rel)


def is_validation(key: str, val_percent: float) -> bool:
    """Stable by-file split: crc32 of ``key`` in basis points against ``val_percent``."""
    return zlib.crc32(key.encode("utf-8")) % 10000 < round(val_percent * 100)


def _read_capped(paths: list[str], max_bytes: int | None) -> list[bytes]:
    """Reads whole files in order until ``max_bytes``; the last one is cut to fit."""
    docs, total = [], 0
    for p in paths:
        if max_bytes is not None and total >= max_bytes:
            break  # also when an earlier token file used up the budget
        with open(p, "rb") as f:
            b = f.read() if max_bytes is None else f.read(max_bytes - total)
        docs.append(b)
        total += len(b)
    return docs


def _tokenize(docs: list[bytes], tok: Tokenizer) -> np.ndarray:
    """Tokenises documents and joins them, each followed by ``tok.doc_sep_id`` (if any)."""
    if isinstance(tok, ByteTokenizer):  # fast path: bytes are already tokens
        sep = bytes([BYTE_DOC_SEP])
        return np.frombuffer(b"".join(d + sep for d in docs), np.uint8)
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    ids = tok.encode_batch(texts) if isinstance(tok, HFTokenizer) else map(tok.encode, texts)
    sep = [] if tok.doc_sep_id is None else [np.asarray([tok.doc_sep_id], np.int32)]
    parts = [x for a in ids for x in (a, *sep)]
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _load_files(paths: list[str], spec: DataSpec, tok: Tokenizer) -> np.ndarray:
    """Token files are memory-mapped (or concatenated); text files are read and tokenised.

    Token files come first, then the text files in order, under one ``max_bytes`` budget.
    """
    arrays, texts, left = [], [], spec.max_bytes  # left: bytes still allowed for the split
    for p in paths:
        if p.endswith(".bin"):
            a = np.memmap(p, dtype=np.dtype(spec.dtype).newbyteorder("<"), mode="r")
        elif p.endswith(".npy"):
            a = np.load(p, mmap_mode="r")
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise ValueError(
                    f"{p}: .npy token files must be 1-D integer, got {a.dtype}{a.shape}"
                )
        else:
            texts.append(p)
            continue
        if left is not None:
            a = a[: left // a.itemsize]
            left -= a.nbytes
        arrays.append(a)
    if texts:
        arrays.append(_tokenize(_read_capped(texts, left), tok))
    # A single file stays memory-mapped; several are concatenated in memory.
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _glob(pattern: str, field: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))  # fmt: skip
    if not paths:
        raise ValueError(f"{field}={pattern!r} matches no files")
    return paths


def load_tokens(spec: "DataSpec | Mapping[str, Any] | Any") -> TokenSplits:
    """Loads the train / validation token arrays described by ``spec``.

    Args:
      spec: a ``DataSpec``, or a dict / ml_collections ConfigDict with its fields.

    Returns:
      ``TokenSplits`` with 1-D ``train`` [N_train] and ``validation`` [N_val] arrays.

    Raises:
      ValueError naming the field: unknown source or field, a glob matching nothing, a token
      >= ``vocab_size``, an empty split.
    """
    spec = DataSpec.from_any(spec)
    tok = load_tokenizer(spec.tokenizer)
    if spec.source == "stdlib":
        root, rel = stdlib_files()
        val = [p for p in rel if is_validation(p, spec.val_percent)]
        train = [p for p in rel if not is_validation(p, spec.val_percent)]
        splits = [
            _tokenize(_read_capped([os.path.join(root, p) for p in ps], spec.max_bytes), tok)
            for ps in (train, val)
        ]
    else:
        train = _glob(spec.train_files, "train_files")
        if spec.validation_files is not None:
            val = _glob(spec.validation_files, "validation_files")
        else:
            val = [p for p in train if is_validation(p, spec.val_percent)]
            train = [p for p in train if not is_validation(p, spec.val_percent)]
        if not train:
            raise ValueError(
                f"train_files: every file fell in validation (val_percent={spec.val_percent})"
            )
        if not val:
            raise ValueError(
                f"validation split empty: no file of train_files={spec.train_files!r} hashed into "
                f"val_percent={spec.val_percent}; set validation_files"
            )
        splits = [_load_files(ps, spec, tok) for ps in (train, val)]
    for name, a in zip(("train", "validation"), splits, strict=True):
        if a.size == 0:
            raise ValueError(f"{name} split is empty (check max_bytes={spec.max_bytes})")
        if spec.vocab_size is not None and (m := int(a.max())) >= spec.vocab_size:
            raise ValueError(f"{name} split has token {m} >= vocab_size={spec.vocab_size}")
    is_token_files = spec.source == "files" and all(p.endswith((".bin", ".npy")) for p in train)
    return TokenSplits(splits[0], splits[1], None if is_token_files and not spec.tokenizer else tok)


def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if seq_len + 1 > len(tokens):
        raise ValueError(
            f"seq_len={seq_len} needs seq_len + 1 = {seq_len + 1} tokens, "
            f"but the split has only {len(tokens)}"
        )
    return len(tokens)


def get_batch(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, step: int
) -> np.ndarray:
    """Random crops keyed by (seed, step): the same arguments always give the same batch.

    Args:
      tokens: 1-D token array [N] (may be a memmap; only the crops are read).
      batch_size: B.
      seq_len: T; each row has T + 1 tokens so that inputs = [:, :-1] and labels = [:, 1:].
      seed, step: non-negative ints; ``np.random.default_rng([seed, step])`` draws the offsets.

    Returns:
      int32 [B, T + 1].
    """
    n = _check_window(tokens, batch_size, seq_len)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    offsets = np.random.default_rng([seed, step]).integers(0, n - seq_len, size=batch_size)  # [B]
    # Slices, not a fancy-index gather: on a memmap that reads B contiguous ranges.
    return np.stack([tokens[o : o + seq_len + 1] for o in offsets]).astype(np.int32)  # [B, T+1]


def num_eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> int:
    """The number of batches ``eval_batches`` yields for these arguments.

    Raises:
      ValueError: as ``eval_batches``.
    """
    n = _check_window(tokens, batch_size, seq_len)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None (every window), got {max_batches}")
    windows = (n - 1) // seq_len
    num = windows // batch_size
    if num == 0:
        raise ValueError(
            f"validation split of {n} tokens holds {windows} windows of "
            f"seq_len={seq_len}, fewer than batch_size={batch_size}"
        )
    return num if max_batches is None else min(num, max_batches)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[np.ndarray]:
    """Fixed, non-overlapping windows spread evenly over ``tokens``, each label predicted once.

    The split holds W = (N - 1) // T windows; window w covers tokens [w * T, w * T + T + 1), so
    windows share only their boundary token. Without a cap every full batch is used, in order.
    With ``max_batches`` the K = max_batches * B windows are every (W // K)-th one: a small
    budget samples the whole split instead of its first few files (the stdlib split is ordered
    by file: on one tiny model its first 64 windows read 2.03 bits/byte, the whole split 2.13).
    A trailing partial batch is dropped (a different shape would recompile the eval step).

    Args:
      tokens: 1-D validation tokens [N].
      batch_size: B windows per batch.
      seq_len: T.
      max_batches: stop after this many batches; None = all full batches.

    Returns:
      An iterator of int32 [B, T + 1] batches.

    Raises:
      ValueError: fewer than ``batch_size`` windows fit in ``tokens``, or ``max_batches`` < 1.
    """
    num = num_eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    windows = (len(tokens) - 1) // seq_len
    starts = np.arange(num * batch_size) * (windows // (num * batch_size)) * seq_len  # [K]

    def gen() -> Iterator[np.ndarray]:
        for b in range(num):
            rows = starts[b * batch_size : (b + 1) * batch_size]  # [B]
            yield np.stack([tokens[s : s + seq_len + 1] for s in rows]).astype(np.int32)

    return gen()  # validated eagerly above, windows produced lazily


def bytes_per_token(tokens: np.ndarray, tokenizer: Tokenizer) -> float:
    """Mean UTF-8 bytes per token of ``tokens`` (decoded with ``tokenizer``).

    Exactly 1.0 for ``ByteTokenizer``. For a long split pass a slice (e.g. the first 100k tokens):
    the mean converges quickly and decoding is O(N).
    """
    if len(tokens) == 0:
        raise ValueError("bytes_per_token needs at least one token")
    return len(tokenizer.decode_bytes(np.asarray(tokens))) / len(tokens)


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
    """Converts a mean cross-entropy in nats per token to bits per byte.

    ``bpb = loss_nats / ln 2 / bytes_per_token``: ln 2 turns nats into bits, and dividing by the
    bytes each token covers turns bits/token into bits/byte, a tokenizer-independent unit.
    """
    return loss_nats / math.log(2) / bytes_per_token
