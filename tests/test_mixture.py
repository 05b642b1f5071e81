"""Mixtures of verifiable tasks: weighted counts, per-domain draws, config, SFT on two domains."""

import collections
import fractions
import json
import math
import os
import re

import ml_collections
import numpy as np
import pytest

from configs import debug, rl_tiny
from mimo_jax import data
from mimo_jax.post_training import policy, sft
from mimo_jax.post_training.tasks import Addition, DigitReversal, Mixture, get_task


def _key(task, prompt):
    """The canonical split key of a prompt, parsed here independently of the task's code."""
    if isinstance(task, DigitReversal):
        return re.fullmatch(r"rev ([0-9]+)=", prompt).group(1)
    a, b = (int(x) for x in re.fullmatch(r"([0-9]+)\+([0-9]+)=", prompt).groups())
    return f"{min(a, b)}+{max(a, b)}"


def _two():
    return Mixture(
        {"rev": DigitReversal(min_digits=3, max_digits=4), "add": Addition()},
        {"rev": 1.0, "add": 3.0},
    )


def test_counts_sum_follow_weights_and_break_ties_by_order():
    three = Mixture({d: Addition() for d in "abc"})
    assert three.counts(4) == {"a": 2, "b": 1, "c": 1}
    assert three.counts(5) == {"a": 2, "b": 2, "c": 1}
    assert three.counts(0) == {"a": 0, "b": 0, "c": 0}
    assert list(three.counts(7)) == ["a", "b", "c"]  # domains order
    assert _two().counts(8) == {"rev": 2, "add": 6}
    # 0.1 + 0.2 + 0.7 is not exactly 1 in floats: still the exact split.
    m = Mixture({d: Addition() for d in "xyz"}, {"x": 0.1, "y": 0.2, "z": 0.7})
    assert m.counts(10) == {"x": 1, "y": 2, "z": 7}
    # Random weights: each count is its exact share rounded down or up, and they sum to n; the
    # rounded-up domains are those of the largest fractional parts.
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = dict(zip("abcde", rng.uniform(0.01, 5.0, 5).tolist(), strict=True))
        m, n = Mixture({d: Addition() for d in w}, w), int(rng.integers(0, 100))
        got = m.counts(n)
        shares = {
            d: n * fractions.Fraction(w[d]) / sum(map(fractions.Fraction, w.values())) for d in w
        }
        assert sum(got.values()) == n
        up = {d for d in w if got[d] == math.floor(shares[d]) + 1}
        assert all(got[d] in (math.floor(shares[d]), math.floor(shares[d]) + 1) for d in w)
        rest = [d for d in w if d not in up]
        assert all(shares[d] % 1 >= shares[e] % 1 for d in up for e in rest)
    with pytest.raises(ValueError, match="n must be >= 0"):
        m.counts(-1)


def test_train_prompts_grouped_deterministic_and_from_each_train_split():
    m = _two()
    pairs = m.train_prompts(7, 40)
    assert pairs == _two().train_prompts(7, 40) and pairs != m.train_prompts(8, 40)
    domains = [d for d, _ in pairs]
    assert domains == ["rev"] * 10 + ["add"] * 30  # grouped, in domains order, counts(40)
    for domain, prompt in pairs:
        task = m.task(domain)
        task.reward(prompt, "")  # a prompt of that task: its verifier parses it
        assert task.split_of(_key(task, prompt)) == "train"
    rev = [p for d, p in pairs if d == "rev"]
    assert all(3 <= len(_key(m.task("rev"), p)) <= 4 for p in rev)  # the domain's options
    # Each domain draws from its own stream: other domains' counts do not change its prompts.
    more = Mixture(dict(rev=m.task("rev"), add=m.task("add")), {"rev": 1.0, "add": 1.0})
    assert [p for d, p in more.train_prompts(7, 40) if d == "rev"][:10] == rev
    assert m.train_prompts(7, 0) == []


def test_sft_examples_rows_domains_and_shuffle():
    m = _two()
    rows = m.sft_examples(3, 40)
    assert rows == _two().sft_examples(3, 40) and rows != m.sft_examples(4, 40)
    assert collections.Counter(r["domain"] for r in rows) == {"rev": 10, "add": 30}
    assert [r["domain"] for r in rows] != ["rev"] * 10 + ["add"] * 30  # shuffled
    for r in rows:
        task = m.task(r["domain"])
        assert set(r) == {"prompt", "response", "domain"}
        assert task.split_of(_key(task, r["prompt"])) == "sft"
        assert task.reward(r["prompt"], r["response"]) == 1.0 and r["response"].endswith("\n")
    for d in m.domains:  # each domain's rows are that task's SFT draw, as a set
        own = [(r["prompt"], r["response"]) for r in rows if r["domain"] == d]
        assert len(set(own)) == len(own)


@pytest.mark.parametrize("task", [DigitReversal(), Addition(max_operand=999)])
def test_one_domain_mixture_is_the_plain_task(task):
    m = Mixture({task.name: task})
    assert m.domains == (task.name,) and m.task(task.name) is task
    assert m.sft_examples(5, 33) == task.sft_examples(5, 33)  # same rows, same order
    assert m.train_prompts(9, 17) == [(task.name, p) for p in task.train_prompts(9, 17)]
    assert m.counts(17) == {task.name: 17}


def test_mixture_errors_name_the_domain():
    m = _two()
    with pytest.raises(ValueError, match=r"unknown domain 'chess'; known domains: rev, add"):
        m.task("chess")
    with pytest.raises(ValueError, match="at least one domain"):
        Mixture({})
    with pytest.raises(ValueError, match=r"domain 'b': expected a Task"):
        Mixture({"a": Addition(), "b": "addition"})
    for bad in (0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match=r"weight of domain 'b' must be a finite number > 0"):
            Mixture({"a": Addition(), "b": Addition()}, {"a": 1.0, "b": bad})
    with pytest.raises(ValueError, match=r"no entry for domain 'b'"):
        Mixture({"a": Addition(), "b": Addition()}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"weights name domain 'c'"):
        Mixture({"a": Addition()}, {"a": 1.0, "c": 1.0})


def _domains_config():
    c = rl_tiny.get_config()
    c.domains = ml_collections.ConfigDict(
        {
            "digit_reversal": {"task": "digit_reversal", "options": {"max_digits": 4}},
            "addition": {"task": "addition", "weight": 2.0},
        }
    )
    return c


def test_mixture_from_config():
    c = rl_tiny.get_config()  # no config.domains: the one task of config.task
    assert "domains" not in c
    m = policy.mixture_from_config(c)
    task = policy.task_from_config(c)
    assert m.domains == (c.task.name,) and m.task(c.task.name) == task
    assert m.sft_examples(c.seed, 50) == task.sft_examples(c.seed, 50)
    c.domains = ml_collections.ConfigDict()  # empty: the same
    assert policy.mixture_from_config(c).domains == (c.task.name,)

    m = policy.mixture_from_config(_domains_config())
    assert set(m.domains) == {"digit_reversal", "addition"}
    assert m.task("digit_reversal") == get_task("digit_reversal", max_digits=4)
    assert m.task("addition") == get_task("addition")
    assert m.weights == {"digit_reversal": 1.0, "addition": 2.0}
    assert m.counts(30) == {"digit_reversal": 10, "addition": 20}


@pytest.mark.parametrize(
    "domain, entry, match",
    [
        ("addition", {"task": "chess"}, r"addition\.task='chess'"),
        ("addition", {"options": {"max_digits": 3}}, r"addition\.task='addition' with options"),
        ("addition", {"weight": 0.0}, r"addition\.weight=0\.0 must be a finite number > 0"),
        ("addition", {"weight": -2.0}, r"addition\.weight=-2\.0"),
        ("x", {"options": {}}, r"x must be a ConfigDict with a task name"),
        ("x", 3, r"x must be a ConfigDict"),
    ],
)
def test_mixture_from_config_errors(domain, entry, match):
    c = _domains_config()
    if domain in c.domains:
        c.domains[domain].update(entry)
    else:
        c.domains[domain] = entry
    with pytest.raises(ValueError, match=r"config\.domains\." + match):
        policy.mixture_from_config(c)


def test_sft_on_two_domains_logs_heldout_success_per_domain(tmp_path):
    c = _domains_config()
    c.model = debug.get_config().model
    c.train.update(
        dict(steps=2, batch_size=4, seq_len=16, warmup_steps=1, log_every=2, eval_every=2,
             checkpoint_every=2, eval_batches=1)
    )  # fmt: skip
    c.sft.update(dict(num_examples=24, heldout_prompts=4))
    dataset, mixture = sft.load_dataset(c, data.ByteTokenizer())
    assert collections.Counter(dataset.domains) == {"digit_reversal": 8, "addition": 16}
    assert mixture.domains == policy.mixture_from_config(c).domains

    wd = str(tmp_path / "sft")
    sft.run(c, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        (last,) = [json.loads(line) for line in f]
    per_domain = [last[f"heldout_success_{d}"] for d in ("digit_reversal", "addition")]
    assert all(0.0 <= s <= 1.0 for s in per_domain)
    assert last["heldout_success"] == pytest.approx(np.mean(per_domain), abs=1e-12)
