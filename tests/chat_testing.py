"""A synthetic hub tokenizer directory for tests: a small byte-level BPE in Qwen2's layout with
ChatML special tokens, a chat template and the special-token files (no download)."""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds its pipeline with it).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHATML = """\
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def write_tokenizer_dir(d: pathlib.Path, corpus: list[str], chat_template: str = CHATML) -> None:
    """Writes tokenizer.json (a 400-id BPE trained on ``corpus``), tokenizer_config.json (with
    ``chat_template``, eos_token ``<|im_end|>``), special_tokens_map.json (pad_token) and
    generation_config.json (eos ids ``<|im_end|>``, ``<|endoftext|>``) into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    # Qwen2's pipeline: transformers' Qwen2Tokenizer rebuilds exactly this from the vocabulary and
    # merges, whatever tokenizer.json says, so the released files must (and do) spell it out.
    tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus * 3, trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",  # the released checkpoint's class
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "add_bos_token": False,
        "chat_template": chat_template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    # Without added_tokens_decoder in the config, transformers reads this file over it.
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
