"""Prompts from a JSONL file (``prompt_file.PromptFile``): a domain without a verifier."""

import json

import pytest

from configs import mopd_tiny
from mimo_jax.post_training import policy, prompt_file, rl


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return str(path)


def test_rows_splits_and_reward(tmp_path):
    rows = [{"prompt": f"q{i}?", "domain": "a" if i % 2 else "b", "response": f"r{i}"}
            for i in range(400)]  # fmt: skip
    path = _write(tmp_path / "p.jsonl", rows)
    src = prompt_file.PromptFile(path=path, domain="a")
    assert len(src.rows) == 200 and all(r["domain"] == "a" for r in src.rows)
    train = set(src.train_prompts(0, 300))
    held = set(src.heldout_prompts(10))
    sft = {r["prompt"] for r in src.sft_examples(0, 20)}
    assert train and held and sft and not (train & held) and not (train & sft)
    assert not (held & sft)
    assert {int(p[1:-1]) % 2 for p in train | held | sft} == {1}  # domain "a" only
    assert src.reward("q1?", "anything") == 0.0 and not src.verifiable
    assert src.train_prompts(3, 5) == src.train_prompts(3, 5)


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"prompt": "x"}', "not json"], r"p\.jsonl:2: invalid JSON"),
        (['{"domain": "a"}'], r"p\.jsonl:1: missing or empty field 'prompt'"),
        (['{"prompt": 3}'], r"p\.jsonl:1: field 'prompt' must be a string"),
        (['{"prompt": "x", "domain": "b"}'], r"no prompts of domain 'a'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=needle):
        prompt_file.PromptFile(path=str(path), domain="a")


def test_a_file_domain_in_a_mixture_and_rl_refuses_it(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}?"} for i in range(50)])
    c = mopd_tiny.get_config()
    c.domains.addition.task = "jsonl"
    c.domains.addition.options = {"path": path}
    mixture = policy.mixture_from_config(c)
    assert [mixture.task(d).verifiable for d in mixture.domains] == [False, True]
    c.domains.addition.options = {"path": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ValueError, match="config.domains.addition.task='jsonl'"):
        policy.mixture_from_config(c)
    c.domains.addition.options = {"path": path}
    with pytest.raises(ValueError, match=r"\['addition'\] have no verifier.*--mode=mopd"):
        rl.run(c, str(tmp_path / "run"))
