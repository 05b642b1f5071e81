"""A synthetic hub tokenizer directory for tests: a small byte-level BPE in Qwen2's layout with
ChatML special tokens, a chat template and the special-token files (no download)."""

import json
import pathlib

from notebooks.synthetic_checkpoint import qwen2_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
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
    # Qwen2's pipeline: transformers' Qwen2Tokenizer rebuilds exactly this from the vocabulary and
    # merges, whatever tokenizer.json says, so the released files must (and do) spell it out.
    tok = qwen2_bpe(corpus * 3, 400, SPECIALS)
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
