"""Verifiable tasks: deterministic disjoint splits, the verifier, junk robustness, loud failures."""

import dataclasses
import math
import random

import pytest

from mimo_jax.post_training import tasks
from mimo_jax.post_training.tasks import (
    TASKS,
    Addition,
    DigitReversal,
    checked_reward,
    extract_answer,
    get_task,
    success_rate,
)

ALL = sorted(TASKS)


@pytest.mark.parametrize("name", ALL)
def test_prompts_deterministic_by_seed(name):
    t = get_task(name)
    assert t.train_prompts(3, 40) == get_task(name).train_prompts(3, 40)
    assert t.train_prompts(3, 40) != t.train_prompts(4, 40)
    assert t.train_prompts(3, 10) == t.train_prompts(3, 40)[:10]
    assert t.heldout_prompts(30) == get_task(name).heldout_prompts(30)
    assert t.heldout_prompts(10) == t.heldout_prompts(30)[:10]
    assert len(set(t.heldout_prompts(30))) == 30
    assert t.sft_examples(5, 20) == t.sft_examples(5, 20)
    assert t.sft_examples(5, 20) != t.sft_examples(6, 20)
    assert t.train_prompts(0, 0) == [] and t.heldout_prompts(0) == []


@pytest.mark.parametrize("name", ALL)
def test_splits_disjoint(name):
    t = get_task(name)
    train = {p for seed in range(5) for p in t.train_prompts(seed, 400)}
    sft = {e["prompt"] for seed in range(5) for e in t.sft_examples(seed, 200)}
    heldout = set(t.heldout_prompts(200))
    assert not train & heldout and not sft & heldout and not train & sft
    if name == "addition":
        # A commuted held-out pair is held out too: no train or SFT prompt is its mirror.
        mirrored = {"+".join(reversed(p[:-1].split("+"))) + "=" for p in heldout}
        assert not mirrored & (train | sft)


@pytest.mark.parametrize("name", ALL)
def test_prompts_short(name):
    t = get_task(name)
    prompts = t.train_prompts(0, 200) + t.heldout_prompts(50)
    assert max(len(p.encode()) for p in prompts) < 32
    for e in t.sft_examples(0, 200):
        assert len(e["response"].encode()) <= t.max_response_bytes


@pytest.mark.parametrize("name", ALL)
def test_sft_responses_pass_the_verifier(name):
    t = get_task(name)
    examples = t.sft_examples(0, 300)
    assert len({e["prompt"] for e in examples}) == 300
    for e in examples:
        assert set(e) == {"prompt", "response", "domain"} and e["domain"] == name
        assert e["response"].endswith(t.terminator)
        assert t.reward(e["prompt"], e["response"]) == 1.0


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("7284\n", 1.0),
        ("7284", 1.0),  # the rollout loop stopped at the newline and dropped it
        ("7284\nrev 1=1\n", 1.0),  # text after the terminator is ignored
        ("  7284 \t\r\n", 1.0),  # spaces, tabs and CR around the answer are tolerated
        ("4827\n", 0.0),  # wrong
        ("72840\n", 0.0),
        ("728\n", 0.0),  # truncated
        ("72", 0.0),
        ("72 84\n", 0.0),  # inner whitespace is not tolerated
        ("\n7284\n", 0.0),  # empty answer line
        ("", 0.0),
        ("7284!\n", 0.0),
        ("seven\n", 0.0),
        ("٧٢٨٤\n", 0.0),  # non-ASCII digits
    ],
)
def test_digit_reversal_verifier(completion, reward):
    assert DigitReversal().reward("rev 4827=", completion) == reward


def test_digit_reversal_keeps_zeros():
    t = DigitReversal()
    assert t.reward("rev 0450=", "0540\n") == 1.0
    assert t.reward("rev 0450=", "540\n") == 0.0


@pytest.mark.parametrize(
    "completion, reward",
    [("42\n", 1.0), ("42", 1.0), (" 42\n", 1.0), ("042\n", 0.0), ("+42\n", 0.0), ("4\n", 0.0)],
)
def test_addition_verifier(completion, reward):
    assert Addition().reward("17+25=", completion) == reward


def test_format_reward_is_opt_in():
    assert DigitReversal().reward("rev 123=", "999\n") == 0.0
    t = DigitReversal(format_reward=0.1)
    assert t.reward("rev 123=", "999\n") == 0.1  # well-formed, wrong
    assert t.reward("rev 123=", "999") == 0.0  # no terminator: not well-formed
    assert t.reward("rev 123=", "9x9\n") == 0.0
    assert t.reward("rev 123=", "321\n") == 1.0
    with pytest.raises(ValueError, match="format_reward"):
        DigitReversal(format_reward=1.0)


def test_extract_answer():
    assert extract_answer(" 12 \nrest") == ("12", True)
    assert extract_answer("12") == ("12", False)
    assert extract_answer(b"\xff12\n") == ("\ufffd12", True)


@pytest.mark.parametrize("name", ALL)
def test_reward_never_raises_on_junk(name):
    t = get_task(name)
    prompt = t.heldout_prompts(1)[0]
    rng = random.Random(0)
    junk = ["", "\n", "\x00" * 9, "\udc80\ud800", "🙂\n", "9" * 10_000, "1" * 5000 + "\n"]
    junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(200)]
    junk += [
        "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(40))) for _ in range(200)
    ]
    for completion in junk:
        r = checked_reward(t, prompt, completion)
        assert r in (0.0, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Broken(DigitReversal):
    """A buggy verifier: it raises on one prompt, returns NaN or a string on the others."""

    name = "broken"

    def reward(self, prompt, completion):
        if prompt == "rev 111=":
            raise ZeroDivisionError("bug")
        return math.nan if prompt == "rev 222=" else "high"


def test_checked_reward_names_task_and_prompt():
    t = _Broken()
    for prompt, cause in [("rev 111=", "raised"), ("rev 222=", "nan"), ("rev 333=", "non-number")]:
        with pytest.raises(ValueError) as err:
            checked_reward(t, prompt, "1\n")
        assert "'broken'" in str(err.value) and repr(prompt) in str(err.value)
        assert cause in str(err.value)
    with pytest.raises(ValueError, match="'digit_reversal'.*'oops'"):
        checked_reward(DigitReversal(), "oops", "1\n")  # malformed prompt: a caller bug


def test_success_rate():
    t = Addition()
    rate = success_rate(t, {"1+2=": ["3\n", "4\n", "3"], "10+5=": ["15\n"]})
    assert rate == 0.75
    # A format reward is not a success.
    assert success_rate(Addition(format_reward=0.5), {"1+2=": ["4\n", "3\n"]}) == 0.5
    with pytest.raises(ValueError, match="no completions"):
        success_rate(t, {})


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'sort'.*addition, digit_reversal"):
        get_task("sort")
    assert get_task("digit_reversal", max_digits=4).max_response_bytes == 5
    with pytest.raises(ValueError, match="min_digits"):
        get_task("digit_reversal", min_digits=5, max_digits=4)


def test_split_too_small_fails_cleanly(monkeypatch):
    monkeypatch.setattr(tasks, "_MAX_DRAWS_PER_PROMPT", 50)
    # One-digit reversal has 10 problems, about one of them held out: 30 distinct cannot exist.
    with pytest.raises(ValueError, match="could not draw 30 heldout"):
        DigitReversal(min_digits=1, max_digits=1).heldout_prompts(30)
