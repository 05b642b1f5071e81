"""SFT data: masks exactly on response labels, determinism, MTP masks, JSONL errors, truncation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.data import ByteTokenizer
from mimo_jax.loss import cross_entropy
from mimo_jax.post_training.sft_data import (
    SFTDataset,
    end_token_id,
    load_examples,
    mtp_targets,
    read_jsonl,
)
from mimo_jax.post_training.tasks import get_task

TOK = ByteTokenizer()
ROWS = [
    {"prompt": "ab", "response": "XY\n"},
    {"prompt": "q", "response": "Z"},  # the byte tokenizer appends the "\n" terminator
    {"prompt": "hello ", "response": "W\n", "domain": "d"},
]


def _expected_row(prompt: str, response: str, t: int):
    """Hand-built ids / labels / mask of one padded example (bytes, pad 0)."""
    text = (prompt + response).encode()
    row = np.zeros(t + 1, np.int32)
    row[: len(text)] = np.frombuffer(text, np.uint8)
    mask = np.zeros(t + 1, np.float32)
    mask[len(prompt) : len(text)] = 1.0  # indexed by token
    return row[:-1], row[1:], mask[1:]


def _all_padded(ds, t):
    b = ds.batch(batch_size=len(ds), seed=0, step=0)  # one epoch: every example once
    return {bytes(b.ids[r][b.ids[r] != 0].astype(np.uint8)): r for r in range(len(ds))}, b


def test_padding_masks_exactly_on_response_labels():
    t = 12
    ds = SFTDataset(ROWS, TOK, t)
    rows, b = _all_padded(ds, t)
    for ex, resp in zip(ROWS, ("XY\n", "Z\n", "W\n"), strict=True):
        ids, labels, mask = _expected_row(ex["prompt"], resp, t)
        r = rows[(ex["prompt"] + resp).encode()]
        np.testing.assert_array_equal(b.ids[r], ids)
        np.testing.assert_array_equal(b.labels[r], labels)
        np.testing.assert_array_equal(b.loss_mask[r], mask)
        assert b.loss_mask[r].sum() == len(resp)  # every response byte, the end included
        np.testing.assert_array_equal(b.positions[r], np.arange(t))
    # Labels are the next tokens.
    np.testing.assert_array_equal(b.labels[:, :-1], b.ids[:, 1:])
    assert b.loss_mask.dtype == np.float32 and b.ids.dtype == np.int32


def test_end_token_choice():
    assert end_token_id(TOK) is None

    class Eos:
        doc_sep_id, eos_id, vocab_size = 5, 7, 10

        def encode(self, text):
            return np.asarray([1 + ord(c) % 8 for c in text], np.int32)

    ds = SFTDataset([{"prompt": "ab", "response": "c"}], Eos(), 6)
    ex = ds.examples[0]
    assert ex.response[-1] == 7 and len(ex.response) == 2  # EOS appended, no "\n"
    b = ds.batch(batch_size=1, seed=0, step=0)
    assert b.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0]
    assert b.labels[0, 2] == 7
    ds = SFTDataset([{"prompt": "ab", "response": "c"}], TOK, 6, end_id=9)
    assert ds.examples[0].response.tolist() == [ord("c"), 9]


def test_batches_pure_function_of_seed_and_step():
    rows = get_task("digit_reversal").sft_examples(0, 20)
    ds = SFTDataset(rows, TOK, 24)
    for packing in (False, True):
        a = ds.batch(batch_size=4, seed=1, step=3, packing=packing)
        b = SFTDataset(rows, TOK, 24).batch(batch_size=4, seed=1, step=3, packing=packing)
        for f in ("ids", "labels", "loss_mask", "positions", "segment_ids"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        c = ds.batch(batch_size=4, seed=1, step=4, packing=packing)
        assert not np.array_equal(a.ids, c.ids)
    # Padding: one epoch of steps sees every example exactly once.
    seen = np.concatenate([ds.batch(batch_size=4, seed=2, step=s).ids for s in range(5)])
    assert len({bytes(r.astype(np.uint8)) for r in seen}) == 20


def test_packing_positions_segments_and_masks():
    rows = get_task("addition").sft_examples(0, 30)
    ds = SFTDataset(rows, TOK, 32)
    b = ds.batch(batch_size=3, seed=0, step=0, packing=True)
    assert (b.segment_ids.max(axis=1) >= 2).all()  # several examples per row
    for r in range(3):
        for s in range(1, b.segment_ids[r].max() + 1):
            idx = np.flatnonzero(b.segment_ids[r] == s)
            assert (np.diff(idx) == 1).all()
            np.testing.assert_array_equal(b.positions[r, idx], np.arange(len(idx)))
            text = bytes(b.ids[r, idx].astype(np.uint8))
            if idx[-1] == 31 and b.labels[r, 31] != 0:  # its end byte is the row's last label
                text += bytes([b.labels[r, 31]])
            ex = next(x for x in rows if (x["prompt"] + x["response"]).encode() == text)
            p = len(ex["prompt"])
            pos = np.arange(len(idx)) + 1  # position of each input's label in the example
            expected = ((pos >= p) & (pos < len(text))).astype(np.float32)
            np.testing.assert_array_equal(b.loss_mask[r, idx], expected)
    # Mask 1 only where the label is a response byte of the same example.
    assert (b.loss_mask[b.segment_ids == 0] == 0).all()
    np.testing.assert_array_equal(b.labels[:, :-1], b.ids[:, 1:])


def test_mtp_masks():
    t = 10
    ds = SFTDataset([{"prompt": "abc", "response": "de\n"}], TOK, t)
    b = ds.batch(batch_size=1, seed=0, step=0)
    # Tokens a b c d e \n; response labels at inputs 2, 3, 4.
    assert b.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    (l0, m0), (l1, m1) = mtp_targets(b, 2)
    np.testing.assert_array_equal(l0, np.roll(b.labels, -1, axis=1))
    assert m0[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # input i predicts token i + 2
    assert m1[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert [chr(l1[0, i]) for i in range(3)] == ["d", "e", "\n"]
    # Packed: an MTP label never crosses into the next example, nor wraps around the row.
    rows = get_task("digit_reversal").sft_examples(1, 30)
    pb = SFTDataset(rows, TOK, 24).batch(batch_size=4, seed=0, step=0, packing=True)
    for k, (lk, mk) in enumerate(mtp_targets(pb, 3)):
        s = k + 1
        on = np.argwhere(mk > 0)
        assert len(on) and (on[:, 1] < 24 - s).all()
        for r, i in on:
            assert pb.segment_ids[r, i] == pb.segment_ids[r, i + s] > 0
            assert pb.loss_mask[r, i + s] == 1 and lk[r, i] == pb.labels[r, i + s]
        assert mk.sum() <= pb.loss_mask.sum()


def test_malformed_jsonl_names_file_line_and_field(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"})
    cases = {
        "not json {": "invalid JSON",
        "[1, 2]": "JSON object",
        json.dumps({"prompt": "p"}): "missing field 'response'",
        json.dumps({"prompt": 3, "response": "r"}): "field 'prompt' must be a string, got int",
        json.dumps({"prompt": "p", "response": ""}): "field 'response' is empty",
        json.dumps({"prompt": "p", "response": "r", "domain": 1}): "field 'domain'",
    }
    for bad, msg in cases.items():
        path = tmp_path / "x.jsonl"
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(ValueError, match=msg) as e:
            read_jsonl(str(path))
        assert f"{path}:3:" in str(e.value)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no SFT examples"):
        read_jsonl(str(path))
    path.write_text(f"{good}\n" + json.dumps({"prompt": "a", "response": "b", "domain": "m"}))
    assert read_jsonl(str(path)) == [
        {"prompt": "p", "response": "r"},
        {"prompt": "a", "response": "b", "domain": "m"},
    ]
    assert load_examples(str(path), num_examples=1) == [{"prompt": "p", "response": "r"}]
    with pytest.raises(ValueError, match=r"rows\[1\]: missing field 'prompt'"):
        SFTDataset([{"prompt": "a", "response": "b"}, {"response": "b"}], TOK, 8, source="rows")


def test_truncation_keeps_the_response_and_its_end():
    t = 8
    rows = [
        {"prompt": "0123456789", "response": "AB\n"},  # prompt cut from the left
        {"prompt": "p", "response": "0123456789\n"},  # response alone too long: dropped
        {"prompt": "xy", "response": "C\n"},
    ]
    ds = SFTDataset(rows, TOK, t)
    assert (len(ds), ds.num_truncated, ds.num_dropped) == (2, 1, 1)
    ex = ds.examples[0]
    assert bytes(ex.prompt.astype(np.uint8)) == b"456789"  # T + 1 - 3 = 6 bytes kept
    assert bytes(ex.response.astype(np.uint8)) == b"AB\n"
    rows_by_text, b = _all_padded(ds, t)
    r = rows_by_text[b"456789AB"]
    assert b.labels[r, -1] == ord("\n") and b.loss_mask[r].tolist() == [0] * 5 + [1] * 3
    with pytest.raises(ValueError, match="all 1 examples dropped"):
        SFTDataset([rows[1]], TOK, t)


def test_task_sft_examples():
    task = get_task("addition")
    rows = task.sft_examples(0, 16)
    assert load_examples("task:addition", seed=0, num_examples=16) == rows
    ds = SFTDataset(rows, TOK, 32)
    assert len(ds) == 16 and ds.num_dropped == ds.num_truncated == 0
    assert set(ds.domains) == {task.name}
    b = ds.batch(batch_size=16, seed=0, step=0)
    for r in range(16):
        response = bytes(b.labels[r][b.loss_mask[r] > 0].astype(np.uint8)).decode()
        prompt = bytes(b.ids[r][: np.argmax(b.loss_mask[r]) + 1].astype(np.uint8)).decode()
        assert response.endswith("\n") and response.count("\n") == 1  # no doubled terminator
        assert task.reward(prompt, response) == 1.0


def test_cross_entropy_ignores_prompt_and_padding_labels():
    rows = get_task("digit_reversal").sft_examples(0, 8)
    for packing in (False, True):
        b = SFTDataset(rows, TOK, 24).batch(batch_size=4, seed=0, step=0, packing=packing)
        logits = jax.random.normal(jax.random.key(0), (*b.ids.shape, 256))
        mask = jnp.asarray(b.loss_mask)
        ce = cross_entropy(logits, jnp.asarray(b.labels), mask)
        junk = np.random.default_rng(0).integers(0, 256, b.labels.shape)
        perturbed = np.where(b.loss_mask > 0, b.labels, junk)
        assert (perturbed != b.labels).any()
        np.testing.assert_array_equal(ce, cross_entropy(logits, jnp.asarray(perturbed), mask))
        # ...and equals the mean NLL over exactly the response labels.
        logp = jax.nn.log_softmax(logits, -1)
        sel = np.argwhere(b.loss_mask > 0)
        nll = [-logp[r, i, b.labels[r, i]] for r, i in sel]
        np.testing.assert_allclose(ce, np.mean(nll), rtol=1e-6)
