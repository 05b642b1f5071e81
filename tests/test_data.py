"""Tests for mimo_jax.data: tokenizers, the stdlib corpus, token files and step-keyed batches."""

import math
import os

import numpy as np
import pytest

from mimo_jax import data

SMALL = 60_000  # max_bytes per split: keeps stdlib reads to a few files


# --- tokenizers -----------------------------------------------------------------------------


def test_byte_round_trip_non_ascii():
    tok = data.ByteTokenizer()
    text = "def f(x):\n    return 'héllo wörld ✓ 日本語 🙂'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert ids.max() > 127  # the multi-byte characters really are bytes > 127
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.vocab_size == 256


def test_byte_decode_replaces_cut_characters_and_rejects_bad_ids():
    tok = data.ByteTokenizer()
    ids = tok.encode("é")  # two bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 300])
    assert isinstance(data.load_tokenizer(None), data.ByteTokenizer)
    assert isinstance(data.load_tokenizer(""), data.ByteTokenizer)


@pytest.fixture
def hf_tokenizer_path(tmp_path):
    """A WordLevel tokenizer.json trained in memory on a few strings (no network)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"])
    corpus = ["the cat sat on the mat", "the dog ate the bone", "a cat and a dog"]
    tok.train_from_iterator(corpus, trainer=trainer)
    # A BOS-style template, as real tokenizers have: corpus encoding must not apply it.
    eos = ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[eos]
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_interface(hf_tokenizer_path):
    tok = data.load_tokenizer(hf_tokenizer_path)
    assert isinstance(tok, data.HFTokenizer)
    assert tok.vocab_size == 2 + 10  # specials + distinct words
    assert tok.doc_sep_id == 1  # "<|endoftext|>", the second special token
    ids = tok.encode("the cat ate the mat")
    assert ids.dtype == np.int32 and ids.shape == (5,)
    assert tok.decode(ids) == "the cat ate the mat"
    assert tok.encode("zebra").tolist() == [0]  # unknown word -> <unk>
    assert data.bytes_per_token(ids, tok) == len("the cat ate the mat") / 5


# --- stdlib corpus --------------------------------------------------------------------------


def test_stdlib_files_found_and_filtered():
    root, rel = data.stdlib_files()
    assert os.path.isfile(os.path.join(root, "os.py"))
    assert "os.py" in rel and "json/decoder.py" in rel
    assert rel == sorted(rel)
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(excluded & set(p.split("/")[:-1]) for p in rel)


def test_split_is_by_file_stable_and_disjoint():
    _, rel = data.stdlib_files()
    val = {p for p in rel if data.is_validation(p, 2)}
    train = set(rel) - val
    assert val and train and not val & train
    # Golden values: crc32-based, so they hold in every process (hash() would not).
    assert data.is_validation("doctest.py", 2) and not data.is_validation("os.py", 2)
    assert 0 < len(val) / len(rel) < 0.1


def test_stdlib_load_deterministic_and_by_file():
    spec = data.DataSpec(max_bytes=SMALL)
    a, b = data.load_tokens(spec), data.load_tokens(spec)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.validation, b.validation)
    assert a.train.dtype == np.uint8 and a.train.ndim == 1
    assert a.validation.size > 0 and a.train.size > 0
    # max_bytes caps the bytes read per split; each document adds one separator.
    n_docs = int((a.train == data.BYTE_DOC_SEP).sum())
    assert a.train.size == SMALL + n_docs
    # Train begins with the first train file, validation with the first validation file.
    root, rel = data.stdlib_files()
    first_val = next(p for p in rel if data.is_validation(p, 2))
    first_train = next(p for p in rel if not data.is_validation(p, 2))
    for tokens, name in ((a.validation, first_val), (a.train, first_train)):
        with open(os.path.join(root, name), "rb") as f:
            head = f.read(200)
        assert tokens[:200].tobytes() == head[: tokens.size]
    assert isinstance(a.tokenizer, data.ByteTokenizer)


def test_stdlib_documents_are_separated():
    s = data.load_tokens({"max_bytes": SMALL, "val_percent": 2})
    # NUL never occurs in source, so every 0 is a boundary and splitting recovers the files.
    docs = s.train.tobytes().split(b"\0")
    assert len(docs) >= 2 and all(docs[:-1])
    assert s.train[-1] == data.BYTE_DOC_SEP


# --- batches --------------------------------------------------------------------------------


def test_get_batch_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    kw = dict(batch_size=4, seq_len=16, seed=7)
    b = data.get_batch(tokens, step=3, **kw)
    assert b.shape == (4, 17) and b.dtype == np.int32
    np.testing.assert_array_equal(b, data.get_batch(tokens, step=3, **kw))
    assert not np.array_equal(b, data.get_batch(tokens, step=4, **kw))
    assert not np.array_equal(b, data.get_batch(tokens, step=3, **{**kw, "seed": 8}))
    # A "resumed" run (steps 3, 4 alone) sees what an uninterrupted run (0..4) saw.
    run = [data.get_batch(tokens, step=s, **kw) for s in range(5)]
    for s in (3, 4):
        np.testing.assert_array_equal(run[s], data.get_batch(tokens, step=s, **kw))


def test_get_batch_rows_are_contiguous_crops_covering_every_offset():
    n, t = 40, 8
    tokens = np.arange(n, dtype=np.int64)
    starts = set()
    for step in range(300):
        b = data.get_batch(tokens, batch_size=5, seq_len=t, seed=0, step=step)
        inputs, labels = b[:, :-1], b[:, 1:]
        np.testing.assert_array_equal(labels, inputs + 1)  # labels are inputs shifted by one
        starts |= set(b[:, 0].tolist())
    assert starts == set(range(n - t))  # every valid offset, the last one included, no more


def test_get_batch_seq_len_too_long():
    with pytest.raises(ValueError, match=r"seq_len=5.*only 5"):
        data.get_batch(np.arange(5), batch_size=1, seq_len=5, seed=0, step=0)
    data.get_batch(np.arange(5), batch_size=1, seq_len=4, seed=0, step=0)  # exactly fits


def test_eval_batches_deterministic_and_non_overlapping():
    tokens = np.arange(103, dtype=np.uint8)
    batches = list(data.eval_batches(tokens, batch_size=2, seq_len=10))
    assert len(batches) == 5  # (103 - 1) // 10 = 10 windows -> 5 batches of 2
    again = list(data.eval_batches(tokens, batch_size=2, seq_len=10))
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert all(x.shape == (2, 11) and x.dtype == np.int32 for x in batches)
    labels = np.concatenate([x[:, 1:].reshape(-1) for x in batches])
    np.testing.assert_array_equal(labels, np.arange(1, 101))  # each predicted exactly once
    capped = list(data.eval_batches(tokens, batch_size=2, seq_len=10, max_batches=2))
    # 4 of the 10 windows, every 2nd: the cap samples the whole split, not just its start.
    np.testing.assert_array_equal([x[:, 0] for x in capped], [[0, 20], [40, 60]])
    capped = list(data.eval_batches(tokens, batch_size=1, seq_len=10, max_batches=3))
    np.testing.assert_array_equal([x[0, 0] for x in capped], [0, 30, 60])
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        data.eval_batches(tokens, batch_size=2, seq_len=10, max_batches=0)
    with pytest.raises(ValueError, match="batch_size=11"):
        data.eval_batches(tokens, batch_size=11, seq_len=10)
    with pytest.raises(ValueError, match="seq_len=200"):
        data.eval_batches(tokens, batch_size=1, seq_len=200)


def test_bits_per_byte():
    assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert data.bits_per_byte(math.log(2) * 4, bytes_per_token=4.0) == pytest.approx(1.0)
    assert data.bytes_per_token(np.arange(10), data.ByteTokenizer()) == 1.0


# --- token and text files -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 60_000 if dtype == "uint16" else 200_000
    train, val = rng.integers(0, high, 1000), rng.integers(0, high, 300)
    train.astype("<" + np.dtype(dtype).str[1:]).tofile(tmp_path / "train.bin")
    val.astype("<" + np.dtype(dtype).str[1:]).tofile(tmp_path / "val.bin")
    spec = dict(source="files", train_files=str(tmp_path / "train.bin"),
                validation_files=str(tmp_path / "val.bin"), dtype=dtype)  # fmt: skip
    s = data.load_tokens(spec)
    np.testing.assert_array_equal(s.train, train)
    np.testing.assert_array_equal(s.validation, val)
    assert s.tokenizer is None  # token files without a tokenizer path: ids only
    with pytest.raises(ValueError, match=f"vocab_size={high // 2}"):
        data.load_tokens({**spec, "vocab_size": high // 2})
    data.load_tokens({**spec, "vocab_size": high})  # max token < high passes
    capped = data.load_tokens({**spec, "max_bytes": 120})  # bytes read per split
    np.testing.assert_array_equal(capped.train, train[: 120 // np.dtype(dtype).itemsize])
    np.testing.assert_array_equal(capped.validation, val[: 120 // np.dtype(dtype).itemsize])


def test_npy_round_trip_memory_mapped(tmp_path):
    train, val = np.arange(500, dtype=np.int32), np.arange(50, 150, dtype=np.int32)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "val.npy", val)
    s = data.load_tokens(data.DataSpec(source="files", train_files=str(tmp_path / "t*.npy"),
                                       validation_files=str(tmp_path / "v*.npy")))  # fmt: skip
    np.testing.assert_array_equal(s.train, train)
    np.testing.assert_array_equal(s.validation, val)
    assert isinstance(s.train, np.memmap)  # a single file is not copied into memory
    assert data.get_batch(s.train, batch_size=2, seq_len=9, seed=0, step=0).shape == (2, 10)


def test_text_files_with_tokenizer_json(tmp_path, hf_tokenizer_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat\nthe dog ate the bone\n")
    (tmp_path / "b.txt").write_text("a dog and a cat\n")
    (tmp_path / "val.txt").write_text("the cat ate the bone\n")
    s = data.load_tokens(
        dict(source="files", train_files=str(tmp_path / "[ab].txt"),
             validation_files=str(tmp_path / "val.txt"), tokenizer=hf_tokenizer_path)
    )  # fmt: skip
    tok = data.HFTokenizer(hf_tokenizer_path)
    eos = tok.doc_sep_id
    want = [*tok.encode("the cat sat on the mat the dog ate the bone"), eos,
            *tok.encode("a dog and a cat"), eos]  # fmt: skip
    assert s.train.tolist() == want
    assert s.validation.tolist() == [*tok.encode("the cat ate the bone"), eos]
    assert isinstance(s.tokenizer, data.HFTokenizer)
    assert data.bytes_per_token(s.validation, s.tokenizer) > 2  # one word per token


def test_text_files_split_by_file_without_validation_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the hash keys: deterministic across runs
    names = [f"doc{i:02d}.txt" for i in range(40)]
    for n in names:
        (tmp_path / n).write_text(f"document {n}\n")
    s = data.load_tokens(dict(source="files", train_files="*.txt", val_percent=20))
    val_docs = s.validation.tobytes().split(b"\0")[:-1]
    train_docs = s.train.tobytes().split(b"\0")[:-1]
    assert len(val_docs) + len(train_docs) == 40 and val_docs and train_docs
    assert not set(val_docs) & set(train_docs)
    want_val = [n for n in sorted(names) if data.is_validation(n, 20)]
    assert [d.decode().split()[1] for d in val_docs] == want_val


# --- spec errors name the field -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, field",
    [
        (dict(source="web"), "source"),
        (dict(source="files"), "train_files"),
        (dict(val_percent=0), "val_percent"),
        (dict(dtype="int8"), "dtype"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_spec_names_field(spec, field):
    with pytest.raises(ValueError, match=field):
        data.load_tokens(spec)


def test_file_errors_name_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="train_files"):
        data.load_tokens(dict(source="files", train_files=str(tmp_path / "none*.bin")))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="validation_files"):
        data.load_tokens(dict(source="files", train_files=str(tmp_path / "train.bin"),
                              validation_files=str(tmp_path / "missing.bin")))  # fmt: skip
    # A single file that hashes into train leaves validation empty.
    assert not data.is_validation("train.bin", 2)
    with pytest.raises(ValueError, match="validation split empty"):
        data.load_tokens(dict(source="files", train_files="train.bin"))


def test_config_dict_spec():
    ml_collections = pytest.importorskip("ml_collections")
    c = ml_collections.ConfigDict(
        dict(
            source="stdlib",
            train_files="",
            validation_files="",
            tokenizer="",
            val_percent=2,
            max_bytes=SMALL,
        )  # fmt: skip
    )
    s = data.load_tokens(c)
    assert s.train.size > 0 and isinstance(s.tokenizer, data.ByteTokenizer)
